"""dbrxq: run Databricks' DBRX quantized on hardware you own.

    import dbrxq
    m = dbrxq.load()                 # or dbrxq.load("path/or/org-repo", device="cuda")
    print(m.generate("Once upon a time", max_new_tokens=32))

The public names load on first use (PEP 562): importing a lower layer (``dbrxq.core``, ``quantize``)
must not pull in the whole stack above it, which imports that layer back. The first public name
asked for loads the top (dbrxq.api, hence the loader, which registers
``DbrxForCausalLM.from_pretrained``).
"""

from importlib import import_module

__all__ = ["load", "DbrxRunner", "DbrxForCausalLM", "DbrxConfig", "DbrxqError", "default_model_dir"]
__version__ = "0.1.0"

_HOMES = {"load": "dbrxq.api", "DbrxRunner": "dbrxq.api", "DbrxForCausalLM": "dbrxq.model.dbrx",
          "DbrxConfig": "dbrxq.model.config", "DbrxqError": "dbrxq.core.errors",
          "default_model_dir": "dbrxq.formats.hub"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'dbrxq' has no attribute {name!r}")
    import_module("dbrxq.api")  # the whole stack, the loader's registration included
    value = getattr(import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
