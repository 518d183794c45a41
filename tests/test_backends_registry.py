"""Backends are plugins: found by entry point, imported only when asked for."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from specforge.backends import Backend, load_backend
from specforge.errors import UsageError
from tests.conftest import run_cli

FAKE_MODULE = textwrap.dedent('''\
    """A third-party backend that knows nothing of specforge's internals."""
    from specforge.backends import Backend, Capabilities

    class FakeBackend(Backend):
        name = "fake"
        description = "lists the IR ops"

        def build(self, program):
            lines = [f"# {program.name}: {len(program.graph.nodes)} nodes"]
            lines += [f"{n.name} = {n.op}({', '.join(n.inputs)})" for n in program.graph]
            return "\\n".join(lines) + "\\n"

        def create_trainer(self, program, device=None, weights=None):
            raise NotImplementedError("this backend only builds")

        def create_model(self, program, weights=None):
            return dict(weights or {})

        def export_weights(self, model, program):
            return dict(model)

        def import_weights(self, model, program, weights):
            model.update(weights)

    class FakeLauncher(FakeBackend):
        """Trains one process per device under torchrun, on CPUs only."""
        name = "fakedp"
        capabilities = Capabilities(data_parallel="torchrun", devices=("cpu",))
    ''')


@pytest.fixture
def fake_backend_path(tmp_path: Path) -> Path:
    """A directory that, on PYTHONPATH, installs a plugin registering backend 'fake'."""
    (tmp_path / "fake_sf_backend.py").write_text(FAKE_MODULE)
    dist = tmp_path / "fake_sf_backend-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-sf-backend\n"
                                   "Version: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[specforge.backends]\nfake = fake_sf_backend:FakeBackend\n"
        "fakedp = fake_sf_backend:FakeLauncher\n"
        "broken = fake_sf_backend:DoesNotExist\n")
    return tmp_path


def test_a_third_party_backend_is_found_and_builds(fake_backend_path, tmp_path):
    env = {"PYTHONPATH": str(fake_backend_path)}
    listed = run_cli("backends", env=env)
    assert "fake\tfake_sf_backend:FakeBackend" in listed.stdout
    out = tmp_path / "out" / "model.py"
    built = run_cli("build", "specs/cifar.yaml", "--backend", "fake", "-o", str(out), env=env)
    assert built.returncode == 0, built.stderr
    text = out.read_text()
    assert text.startswith("# cifar10-seed: 14 nodes\n")
    assert "conv2d_1 = conv2d(input)" in text
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.py"]  # no temporary file


def test_backends_lists_each_backends_capabilities(fake_backend_path):
    listed = run_cli("backends", env={"PYTHONPATH": str(fake_backend_path)})
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    fake = lines.index("fake\tfake_sf_backend:FakeBackend")
    assert lines[fake + 1:fake + 3] == [
        "  lists the IR ops",
        "  build styles: exact; devices: auto, cpu; does not train data-parallel"]
    fakedp = lines.index("fakedp\tfake_sf_backend:FakeLauncher")
    assert lines[fakedp + 2] == ("  build styles: exact; devices: auto, cpu; trains "
                                 "data-parallel with --nproc-per-node/--nnodes")
    broken = lines.index("broken\tfake_sf_backend:DoesNotExist")
    assert lines[broken + 1].startswith("  error: backend 'broken' is installed but failed")


def test_data_parallel_options_follow_the_capabilities_not_the_name(fake_backend_path):
    env = {"PYTHONPATH": str(fake_backend_path)}
    none = run_cli("run", "specs/digits.yaml", "-b", "fake", "--nproc-per-node", "2", env=env)
    assert none.returncode == 2
    assert "--nproc-per-node/--nnodes: the fake backend does not train data-parallel" \
        in none.stderr
    in_process = run_cli("run", "specs/digits.yaml", "-b", "fakedp", "--data-parallel",
                         env=env)
    assert in_process.returncode == 2
    assert "the fakedp backend trains data-parallel with --nproc-per-node/--nnodes" \
        in in_process.stderr
    # a third-party torchrun backend gets past the capability check, to the launcher's own
    launched = run_cli("run", "specs/digits.yaml", "-b", "fakedp", "--nnodes", "2", env=env)
    assert launched.returncode == 2
    assert "--nnodes > 1 needs --rdzv-endpoint" in launched.stderr


def test_devices_follow_the_capabilities(fake_backend_path):
    env = {"PYTHONPATH": str(fake_backend_path)}
    cuda = run_cli("run", "specs/digits.yaml", "-b", "fakedp", "--device", "cuda", env=env)
    assert cuda.returncode == 2
    assert "--device 'cuda': the fakedp backend does not train on it; valid: auto, cpu" \
        in cuda.stderr
    spec = run_cli("run", "specs/digits.yaml", "-b", "fakedp", "--set",
                   "training.device=cuda", env=env)
    assert spec.returncode == 2
    assert "training.device 'cuda': the fakedp backend" in spec.stderr
    for device in ("cpu", "auto"):  # accepted: the fake backend then fails to train
        result = run_cli("run", "specs/digits.yaml", "-b", "fakedp", "--device", device,
                         "--run-dir", str(fake_backend_path / "run"), env=env)
        assert "this backend only builds" in result.stderr, result.stderr[-2000:]


def test_unknown_backend_suggests_the_installed_ones(fake_backend_path):
    result = run_cli("build", "specs/cifar.yaml", "-b", "fak",
                     env={"PYTHONPATH": str(fake_backend_path)})
    assert result.returncode == 2
    assert "unknown backend 'fak': did you mean 'fake'?" in result.stderr
    listed = result.stderr.split("installed backends: ")[1].split()
    names = [n.rstrip(",") for n in listed]
    assert names == sorted(names) and {"broken", "fake"} <= set(names)


def test_a_broken_plugin_is_reported_not_raised(fake_backend_path):
    result = run_cli("build", "specs/cifar.yaml", "-b", "broken",
                     env={"PYTHONPATH": str(fake_backend_path)})
    assert result.returncode == 2
    assert "backend 'broken' is installed but failed to load: AttributeError" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_spec_error_leaves_no_output_file(fake_backend_path, tmp_path, write_spec):
    spec = write_spec("model: {input: [8, 8, 1], layers: [{type: dense, units: 2}]}\n"
                      "loss: {type: mse}\noptimizer: {type: sgd}\n")
    out = tmp_path / "never.py"
    result = run_cli("build", str(spec), "-b", "fake", "-o", str(out),
                     env={"PYTHONPATH": str(fake_backend_path)})
    assert result.returncode == 2
    assert "dense needs a flat input" in result.stderr
    assert not out.exists()


def test_load_backend_without_plugins_says_none_is_installed(monkeypatch):
    monkeypatch.setattr("specforge.backends.installed_backends", lambda: {})
    with pytest.raises(UsageError, match="no backend is installed"):
        load_backend("torch")


def test_backend_interface_is_abstract():
    with pytest.raises(TypeError):
        Backend()  # type: ignore[abstract]
