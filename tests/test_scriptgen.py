"""scriptgen's copying: what a definition uses, dispatch tables cut to the used kinds."""

from __future__ import annotations

import ast
from pathlib import Path

from specforge.scriptgen import copied, used

MODULE = '''
def helper(x: Unused) -> int:
    return x


def square(x: int) -> int:
    return helper(x) * x


def cube(x: int) -> int:
    return x ** 3


class Unused:
    pass


POWERS = {"square": square, "cube": cube}


def power(kind: str, x: int) -> int:
    return POWERS[kind](x)
'''

GENERATED = Path(__file__).parent.parent / "generated"


def test_used_follows_only_the_kept_entries_of_a_table_and_no_annotations(tmp_path: Path):
    module = tmp_path / "m.py"
    module.write_text(MODULE, encoding="utf-8")
    assert used(module, ["power"]) == ["helper", "square", "cube", "POWERS", "power"]
    kinds = {"POWERS": {"square"}}
    names = used(module, ["power"], kinds)
    assert names == ["helper", "square", "POWERS", "power"]
    text = copied([(module, names)], kinds)
    assert 'POWERS = {"square": square}' in text and "cube" not in text
    namespace: dict = {"Unused": object}
    exec(compile(ast.parse(text), "copied", "exec"), namespace)
    assert namespace["power"]("square", 3) == 9


def test_exact_scripts_carry_only_their_specs_kinds():
    digits = (GENERATED / "digits_torch_exact.py").read_text(encoding="utf-8")
    assert "apply_augmentation" not in digits and "AugmentedPipeline" not in digits
    cifar = (GENERATED / "cifar_torch_exact.py").read_text(encoding="utf-8")
    assert 'OPTIMIZERS = {"adam": adam}' in cifar and "def sgd(" not in cifar
    assert 'LOSSES = {"cross_entropy": cross_entropy}' in cifar
    assert 'AUGMENTATIONS = {"affine": affine, "horizontal_flip": flip_horizontally}' in cifar
    assert "def shift_with_zeros(" not in cifar and "def averaged(" not in cifar


def test_exact_scripts_run_the_loop_and_steps_specforge_run_runs():
    """One source: the loop is runner.TrainingLoop as written there (specforge run's Loop
    extends it), and the trainer the backend's own Steps class, not a restatement."""
    from specforge import runner

    backends = GENERATED.parent / "backends"
    for framework, steps in (("torch", "Steps"), ("keras", "KerasSteps")):
        text = (GENERATED / f"cifar_{framework}_exact.py").read_text(encoding="utf-8")
        trainer = backends / f"specforge_{framework}" / "trainer.py"
        assert copied([(runner, ["TrainingLoop"])]) in text
        assert copied([(trainer, [steps])]) in text
        assert "class ScriptLoop(TrainingLoop):" in text and "\ndef train(" not in text
        assert f"steps = {steps}(" in text and "run(args, pipeline, steps" in text


def test_exact_scripts_use_the_frameworks_layers_where_they_compute_the_same():
    torch_script = (GENERATED / "cifar_torch_exact.py").read_text(encoding="utf-8")
    assert "nn.Conv2d(3, 32, (3, 3), stride=(1, 1), padding=(0, 0))" in torch_script
    assert "class Conv2d(" not in torch_script and "class MaxPool2d(" not in torch_script
    assert "class Activation(" not in torch_script
    keras_script = (GENERATED / "cifar_keras_exact.py").read_text(encoding="utf-8")
    assert "keras.layers.Conv2D(32, (3, 3), strides=(1, 1), name='conv2d_1')" in keras_script
    assert "class Conv2D(" not in keras_script and "class Activation(" not in keras_script


#: Methods the frameworks call, never a script's own code.
FRAMEWORK_HOOKS = {"forward", "build", "call", "compute_output_shape", "get_config",
                   "update_step", "result", "on_train_batch_begin"}


def _unused(text: str) -> list[str]:
    """Top-level definitions and methods that nothing in ``text`` names (a load, an
    attribute or a string), the frameworks' hooks and ``main`` aside."""
    tree = ast.parse(text)
    named = {"main"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            named.add(node.id)
        elif isinstance(node, ast.Attribute):
            named.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            named.add(node.value)
    found = []
    for node in tree.body:
        names = [node.name] if isinstance(node, ast.FunctionDef | ast.ClassDef) else [
            n.id for t in getattr(node, "targets", [getattr(node, "target", None)])
            if t is not None for n in ast.walk(t) if isinstance(n, ast.Name)]
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [] if getattr(node, "module", "") == "__future__" else [
                (a.asname or a.name).split(".")[0] for a in node.names]
        found += [n for n in names if n not in named]
        if isinstance(node, ast.ClassDef):
            found += [f"{node.name}.{m.name}" for m in node.body
                      if isinstance(m, ast.FunctionDef) and not m.name.startswith("__")
                      and m.name not in FRAMEWORK_HOOKS and m.name not in named]
    return found


def test_generated_scripts_define_only_what_their_code_uses():
    """'Only what the spec uses': no script defines a function, class, method, setting or
    import that none of its code uses (the code copied from specforge included)."""
    scripts = sorted(GENERATED.glob("*.py"))
    assert len(scripts) == 28
    unused = {path.name: _unused(path.read_text(encoding="utf-8")) for path in scripts}
    assert {name: found for name, found in unused.items() if found} == {}


def test_finishing_a_script_leaves_out_what_nothing_uses():
    from specforge.scriptgen import finished

    script = '''from __future__ import annotations

# {imports}
from typing import Any

import numpy as np
import torch

LIMIT = 3
# {definitions}


def helper() -> int:
    return LIMIT


class Layer:
    def forward(self, x: Tensor) -> Tensor:
        return x

    def unused(self) -> int:
        return helper() + json.loads("1")

    def named(self) -> Batch:
        return getattr(self, "forward")(np.zeros(SHUFFLE))


def main() -> None:
    print(Layer().named())
'''
    text = finished(script)
    assert _unused(text) == []
    assert "def unused" not in text and "def helper" not in text and "LIMIT" not in text
    assert "import json" not in text and "import torch" not in text
    assert "def forward" in text and "def named" in text  # a hook, and named in a string
    assert "Batch = Tensor = Any\n" in text and "SHUFFLE = 2  #" in text
    namespace: dict = {}
    exec(compile(text, "finished", "exec"), namespace)
    assert namespace["Layer"]().named().shape == (2,)


def test_an_exact_script_without_data_builds_the_model_with_specforges_weights(tmp_path: Path):
    """A spec without `data:` has nothing to train on: its exact script carries the model
    and its initial weights only, and saves them (specforge's, bit for bit)."""
    import subprocess

    import numpy as np
    import torch
    from specforge_torch.build import render_script

    from specforge.compiler import compile_text
    from specforge.weights import draw
    from tests.processes import without_specforge

    program = compile_text("""name: no-data
model:
  input: [6, 6, 2]
  layers: [{type: conv2d, filters: 3, kernel: 3}, {type: flatten}, {type: dense, units: 2}]
loss: {type: cross_entropy, from_logits: true}
optimizer: {type: adam}
""", "no-data.yaml")
    text = render_script(program)
    assert "DataPipeline" not in text and "class Steps" not in text and "TrainingLoop" not in text
    script = tmp_path / "no_data.py"
    script.write_text(text, encoding="utf-8")
    refused = subprocess.run(without_specforge(script), capture_output=True, text=True)
    assert refused.returncode == 2 and "no `data:` section" in refused.stderr
    saved = subprocess.run(without_specforge(script, "--save", str(tmp_path / "w.pt")),
                           capture_output=True, text=True)
    assert saved.returncode == 0, saved.stderr
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    node = program.graph["conv2d_1"]
    kernel = draw(node.params[0], "conv2d_1.kernel", program.seed)
    assert np.array_equal(state["conv2d_1.weight"].numpy(), kernel.transpose(3, 2, 0, 1))


def test_an_exact_script_refuses_labels_the_model_has_no_output_for(tmp_path: Path):
    """As `specforge run` does (exit code 2, the data named), not an IndexError mid-step."""
    import subprocess

    from specforge_torch.build import render_script

    from specforge.compiler import compile_text
    from tests.processes import without_specforge

    program = compile_text("""name: two-outputs
model: {input: [4, 4, 1], layers: [{type: flatten}, {type: dense, units: 2}]}
loss: {type: cross_entropy, from_logits: true}
optimizer: {type: sgd}
data: {source: {type: synthetic, samples: 20, classes: 5}, batch_size: 4}
""", "two-outputs.yaml")
    script = tmp_path / "two_outputs.py"
    script.write_text(render_script(program), encoding="utf-8")
    result = subprocess.run(without_specforge(script, "--epochs", "1"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "5 classes, more than the model's 2 outputs" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_exact_script_names_an_unreadable_image_and_exits_2(tmp_path: Path):
    """A truncated PNG in an image folder: the file named, exit code 2, no traceback (as
    `specforge run`; the README's claim for built scripts)."""
    import subprocess

    from specforge_torch.build import render_script

    from specforge.compiler import compile_text
    from tests.processes import image_folders, without_specforge

    root = image_folders(tmp_path / "images", classes=2, per_class=3, size=8)
    broken = root / "train" / "class_1" / "1.png"
    broken.write_bytes(broken.read_bytes()[:40])
    program = compile_text("""name: folders
model: {input: [8, 8, 3], layers: [{type: flatten}, {type: dense, units: 2}]}
loss: {type: cross_entropy, from_logits: true}
optimizer: {type: sgd}
data: {source: {type: image_folder, train: train, test: test}, batch_size: 2}
""", "folders.yaml")
    script = tmp_path / "folders.py"
    script.write_text(render_script(program), encoding="utf-8")
    result = subprocess.run(without_specforge(script, "--data-dir", str(root), "--epochs", "1"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"cannot read image {broken}" in result.stderr and "Traceback" not in result.stderr
