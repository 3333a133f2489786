"""Model families: plain forward functions over params pytrees."""
