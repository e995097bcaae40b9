"""dbrxq: run Databricks' DBRX quantized on hardware you own.

    import dbrxq
    m = dbrxq.load()                 # or dbrxq.load("path/or/org-repo", device="cuda")
    print(m.generate("Once upon a time", max_new_tokens=32))
"""

from .api import DbrxRunner, default_model_dir, load
from .config import DbrxConfig
from .errors import DbrxqError
from .model import DbrxForCausalLM

__all__ = ["load", "DbrxRunner", "DbrxForCausalLM", "DbrxConfig", "DbrxqError", "default_model_dir"]
__version__ = "0.1.0"
