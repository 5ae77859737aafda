"""Shared test helpers. Tests never touch the network."""

import os
import subprocess
import sys
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Prepended to code run by `run_without_simmim_hf` (or by hand): makes `import simmim_hf` fail exactly as on a machine
# where the package is not installed, whether or not this machine has it (e.g. as an editable install).
BLOCK_SIMMIM_HF = """
import importlib.abc, sys
class _NoSimMIMHF(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "simmim_hf" or name.startswith("simmim_hf."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, _NoSimMIMHF())
sys.modules.pop("simmim_hf", None)
def assert_simmim_hf_absent():
    try:
        import simmim_hf  # noqa: F401
    except ModuleNotFoundError:
        return
    raise AssertionError("simmim_hf must not be importable here")
assert_simmim_hf_absent()
"""


def run_without_simmim_hf(code: str, cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python process in which `simmim_hf` cannot be imported; raise with its output
    if it fails. Use it to prove that a saved folder loads through `trust_remote_code` alone."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    script = BLOCK_SIMMIM_HF + textwrap.dedent(code)
    result = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
