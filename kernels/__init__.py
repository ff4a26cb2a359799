"""kvloom's compute kernels, imported as `kvloom.kernels` (attention, the KV cache's storage format).

Imported under the bare name `kernels` it hands that name over to Hugging Face's `kernels` library: in a
source checkout the repository root is on `sys.path` (a test run, `python -m` from the root), where this
folder would shadow the library that transformers imports when it builds a PyTorch model.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # what `import kernels` returns
    _spec.loader.exec_module(_module)
