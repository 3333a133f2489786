"""jaxmm's entry in lmms-eval's model registry (the entry-point group `lmms_eval.models`).

lmms-eval loads MANIFEST from every installed package when its registry starts, whatever model
a run asks for; the manifest names the class by path, so `jaxmm.eval.lmms` (the model itself)
is imported only by runs that pass `--model jaxmm`.
"""
from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="jaxmm", simple_class_path="jaxmm.eval.lmms.Jaxmm")
