"""The installed `kvloom` is one namespace: a user's own `engine/` or `tools/` package never shadows it."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = """
import kvloom, kvloom.engine.engine, kvloom.tools.cli, kvloom.api.server, kvloom.kernels.attention
from kvloom import Engine, EngineConfig, SamplingParams, create_app
import engine, tools
assert engine.MINE and tools.MINE, "the user's own packages import as themselves"
for module in (kvloom.engine.engine, kvloom.tools.cli, kvloom.api.server):
    assert not module.__file__.startswith({cwd!r}), module.__file__
print("ok", Engine.__module__, create_app.__module__)
"""


@pytest.fixture
def user_project(tmp_path):
    """A directory holding the user's own `engine` and `tools` packages."""
    for name in ("engine", "tools", "api"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("MINE = True\n")
    return tmp_path


@pytest.mark.parametrize("how", ["installed", "checkout"])
def test_user_packages_do_not_shadow_kvloom(user_project, how):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if how == "checkout":
        env["PYTHONPATH"] = ROOT  # the source tree, as the tests' subprocesses see it
    out = subprocess.run([sys.executable, "-c", CHECK.format(cwd=str(user_project))], cwd=user_project,
                         env=env,
                         capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok kvloom.engine.engine")


def test_kvloom_command_runs_beside_user_packages(user_project):
    kvloom = os.path.join(os.path.dirname(sys.executable), "kvloom")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    out = subprocess.run([kvloom, "serve", "--help"], cwd=user_project, env=env, capture_output=True,
                         text=True,
                         timeout=100)
    assert out.returncode == 0, out.stderr
    assert "--model" in out.stdout


KERNELS_CHECK = """
import importlib.metadata, sys
import kvloom.kernels.attention
try:
    importlib.metadata.version("kernels")
    installed = True
except importlib.metadata.PackageNotFoundError:
    installed = False
try:
    import kernels
except ModuleNotFoundError:
    assert not installed, "Hugging Face's kernels is installed but did not import"
    print("absent")
else:
    assert kernels.__file__ != {own!r}, kernels.__file__
    assert kvloom.kernels.attention.prefix_extend_attention
    print("library")
"""


def test_the_checkout_s_kernels_folder_does_not_shadow_hugging_face_s_kernels_library():
    """From the repository root (as in a test run), `import kernels` is Hugging Face's library, which
    transformers imports to build a PyTorch model, or absent; kvloom's own stays `kvloom.kernels`."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    check = KERNELS_CHECK.format(own=os.path.join(ROOT, "kernels", "__init__.py"))
    out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=100)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("library", "absent")
