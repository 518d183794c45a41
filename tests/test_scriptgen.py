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
