"""What export and runtime share, imported by both and importing neither (docs/architecture.md): the model spec
(spec.py), the model families (families.py), the graph contracts and their limits (contracts.py), the artifact
manifest (manifest.py), the error root (errors.py) and the TensorRT import (trt_compat.py)."""
