"""MG-FTE: mutually guided few-shot relational triple extraction (Yang et al., ICASSP 2023)."""
