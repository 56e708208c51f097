"""Fuzzing the recipe loader and ``--set`` (issue 23): every input ends in exit 0, or exit 2 with
``error:`` lines, never a traceback, never more than 10 s. 500+ examples each here; the slow run
(``BIWM_FUZZ_EXAMPLES=5000 pytest -m slow tests/test_fuzz_recipe.py``) takes more."""

import os
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_defects import QUICKSTART, cli

EXAMPLES = int(os.environ.get("BIWM_FUZZ_EXAMPLES", "500"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

FIELDS = ["seed", "name", "run_dir", "data.frames", "data.train_clips", "data.toyworld.height", "data.prompt",
          "model.attention", "model.backbone", "model.backbone.options.preset", "model.backbone.options.weights",
          "model.controls", "model.controls[0]", "model.controls[1].options.hidden", "model.compressor",
          "model.compressor.options.max_frames", "stages", "stages[0]", "stages[9].steps", "finetune.steps",
          "finetune.lr", "finetune.betas", "distill.losses", "distill.losses[0].options", "distill.betas",
          "distill.teacher_cfg", "generate.keys", "generate.chunks", "evaluate.cfg_scale", "export.folder",
          "resolved", "finetune.steps.x", "model.controls[1].name.x", "stages.0.stage"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**30), max_value=10**30),
                    st.floats(), st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                                              inner, max_size=4),
                      max_leaves=10)
yaml_values = values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n..."))
raw_values = st.one_of(yaml_values, st.text(max_size=40),
                       st.sampled_from(["[1", "{a", "9" * 5000, ".inf", ".nan", "-.inf", "w*99999999999999",
                                        "*a", "&a [1]", "!!python/object:os.system", "''", "~", "0x10", "1e39",
                                        "[2.0, 0.999]", "{stage: export, folder: ..}", "..", "/etc"]))
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=30),
                 st.sampled_from(FIELDS).map(lambda f: f + "[0]"), st.sampled_from(FIELDS).map(lambda f: f + ".x"))
overrides = st.one_of(st.tuples(keys, raw_values).map(lambda kv: f"{kv[0]}={kv[1]}"), st.text(max_size=30))


def check(result, started: float) -> None:
    assert time.time() - started < 10
    assert result.exit_code in (0, 2), (result.exit_code, result.exception, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    if result.exit_code == 2:
        lines = result.stderr.splitlines()
        assert lines and all(line.startswith(("error:", "warning:")) for line in lines), result.stderr
        assert all(len(line) < 4000 for line in lines)


def _fuzz_set(items: list[str]) -> None:
    args = ["validate", QUICKSTART]
    for item in items:
        args += ["--set", item]
    started = time.time()
    check(cli(*args), started)


@FUZZ
@given(st.lists(overrides, min_size=1, max_size=3))
def test_fuzzed_set_overrides(items):
    _fuzz_set(items)


with open(QUICKSTART) as f:
    BASE = yaml.safe_load(f)


@st.composite
def recipes(draw):
    """The quickstart with fields replaced, removed or added, or text and bytes of any kind."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(["top", "data", "model", "stage"]))
        stages = data.get("stages") if isinstance(data.get("stages"), list) else []
        node = {"top": data, "data": data.get("data"), "model": data.get("model"),
                "stage": stages[draw(st.integers(0, len(stages) - 1))] if stages else None}[section]
        if not isinstance(node, dict):
            node = data
        existing = sorted(str(k) for k in node)
        key = draw(st.one_of(st.sampled_from(existing), st.text(max_size=8)) if existing else st.text(max_size=8))
        if draw(st.booleans()):
            node[key] = draw(values)
        else:
            node.pop(key, None)
    text = yaml.safe_dump(data, allow_unicode=True)
    if kind == 3:  # cut somewhere: broken YAML
        text = text[:draw(st.integers(0, len(text)))]
    return text.encode("utf-8", "surrogatepass")


@FUZZ
@given(recipes())
def test_fuzzed_recipe_files(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    path.write_bytes(content)
    started = time.time()
    check(cli("validate", str(path)), started)


@pytest.mark.slow
@pytest.mark.skipif(EXAMPLES < 1000, reason="the slow run: BIWM_FUZZ_EXAMPLES=5000 pytest -m slow")
@settings(max_examples=EXAMPLES * 4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(overrides, min_size=1, max_size=6))
def test_fuzzed_set_overrides_slow(items):
    _fuzz_set(items)
