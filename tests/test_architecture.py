"""The data flow of ../shared/ARCHITECTURE.md, enforced: every import of a layerscope module by another is read from
the source (ast, no import side effects) and checked against the layers' rules, and forward hooks are registered
by the engine only."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "src" / "layerscope"

# package -> layerscope packages/modules it must not import (prefix match on the dotted name)
FORBIDDEN = {
    # the engine knows nothing of families, studies, reports or the world: it talks to models through Backend
    "layerscope.engine": (
        "layerscope.models",
        "layerscope.experiments",
        "layerscope.loading",
        "layerscope.report",
        "layerscope.world",
        "layerscope.testing",
        "layerscope.main_job",
        "layerscope.cli",
        "layerscope.metrics",
        "layerscope.stats",
    ),
    # adapters implement the engine's contract; they do not know experiments, reports or how they were loaded
    "layerscope.models": (
        "layerscope.experiments",
        "layerscope.loading",
        "layerscope.report",
        "layerscope.world",
        "layerscope.testing",
        "layerscope.main_job",
        "layerscope.cli",
    ),
    # experiments get a loaded model and the engine's public API, never its internals
    "layerscope.experiments": (
        "layerscope.loading",
        "layerscope.report",
        "layerscope.main_job",
        "layerscope.cli",
        "layerscope.models.unet",
        "layerscope.models.transformer",
        "layerscope.models.latent",
        "layerscope.models.pipeline",
        "layerscope.testing",
        "layerscope.engine.",
    ),  # the package `layerscope.engine` itself is the public API
    # running cells on workers: the one place besides the CLI and the main job that loads models for a study
    "layerscope.executors": ("layerscope.report", "layerscope.main_job", "layerscope.cli", "layerscope.testing"),
    # the report renders saved Results: no models, no loading, no world, no test doubles
    "layerscope.report": (
        "layerscope.world",
        "layerscope.loading",
        "layerscope.models",
        "layerscope.testing",
        "layerscope.main_job",
        "layerscope.cli",
    ),
    # leaf utilities
    "layerscope.stats": (
        "layerscope.engine",
        "layerscope.models",
        "layerscope.experiments",
        "layerscope.report",
        "layerscope.loading",
        "layerscope.world",
        "layerscope.metrics",
        "layerscope.main_job",
    ),
    "layerscope.metrics": (
        "layerscope.engine",
        "layerscope.models",
        "layerscope.experiments",
        "layerscope.report",
        "layerscope.loading",
        "layerscope.world",
        "layerscope.main_job",
    ),
    # the world is a data source + oracle + zoo: it reaches the rest of layerscope only through those
    "layerscope.world": (
        "layerscope.engine",
        "layerscope.models",
        "layerscope.experiments",
        "layerscope.report",
        "layerscope.loading",
        "layerscope.main_job",
        "layerscope.cli",
        "layerscope.metrics",
        "layerscope.stats",
        "layerscope.testing",
    ),
    "layerscope.layers": ("layerscope.engine", "layerscope.models", "layerscope.experiments", "layerscope.loading"),
}
HOOK_CALLS = re.compile(r"register_forward_(pre_)?hook|register_module_forward(_pre)?_hook|register_full_backward")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    base = ROOT.parent.joinpath(*dotted.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted target) of every layerscope import in a file, relative imports resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import x` imports the module x: names that are modules are checked as module paths too
            targets = [target] + [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        out += [(node.lineno, t) for t in targets if t == "layerscope" or t.startswith("layerscope.")]
    return out


def _violations() -> list[str]:
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        name = _module_name(path)
        rules = [rule for owner, rule in FORBIDDEN.items() if name == owner or name.startswith(owner + ".")]
        for line, target in _imports(path):
            for rule in rules:
                for banned in rule:  # "pkg." bans the package's submodules but not the package itself
                    hit = (
                        target.startswith(banned)
                        if banned.endswith(".")
                        else (target == banned or target.startswith(banned + "."))
                    )
                    if hit:
                        bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {name} imports {target}")
    return sorted(set(bad))


def test_imports_follow_the_data_flow():
    assert _violations() == []


def test_the_rules_catch_a_violation(tmp_path, monkeypatch):
    """The checker itself: an engine module importing an adapter is reported."""
    fake = tmp_path / "layerscope"
    (fake / "engine").mkdir(parents=True)
    (fake / "engine" / "bad.py").write_text("from ..models.base import Generator\nfrom . import spec\n")
    (fake / "engine" / "spec.py").write_text("")
    (fake / "engine" / "hooks.py").write_text("")
    (fake / "experiments").mkdir()
    (fake / "experiments" / "bad.py").write_text(
        "from ..engine.hooks import installed_hooks\nfrom ..engine import Capture\n"
    )
    monkeypatch.setattr(__import__(__name__), "ROOT", fake)
    found = _violations()
    assert any("layerscope.engine.bad imports layerscope.models.base" in v for v in found)
    assert any("layerscope.experiments.bad imports layerscope.engine.hooks" in v for v in found)
    assert len(found) == 2  # the engine's own modules and its public package are fine


def test_only_the_engine_registers_hooks():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.relative_to(ROOT).parts[0] == "engine":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if HOOK_CALLS.search(line):
                offenders.append(f"{path.relative_to(ROOT.parent)}:{i}")
    assert offenders == []


@pytest.mark.parametrize("module", ["injection", "abstractions", "properties", "alignment"])
def test_experiments_do_not_reach_into_models(module):
    """Experiments decide from metadata: no pipeline internals, module paths or spec/family tests."""
    src = (ROOT / "experiments" / f"{module}.py").read_text()
    for pattern in (
        r"\.pipe\b",
        r"\.module\(",
        r"\.taps\b",
        r"\.spec\.startswith",
        r"\.family\b",
        r"get_submodule",
        r"\.variant\b",
    ):
        assert not re.search(pattern, src), f"experiments/{module}.py matches {pattern!r}"


def test_every_experiment_has_the_shape_and_a_section():
    from layerscope.experiments.base import Result
    from layerscope.report.sections import SECTIONS

    assert [s.KEY for s in SECTIONS] == ["injection", "abstractions", "properties", "alignment"]
    for sec in SECTIONS:
        exp = sec.EXPERIMENT
        assert exp.NAME == sec.KEY
        assert callable(exp.run) and callable(exp.main_job) and callable(sec.render)
        assert exp.Settings.__dataclass_params__.frozen
        for job in exp.main_job(quick=True):
            assert isinstance(job.settings, exp.Settings)
        assert Result.__name__ in exp.run.__annotations__.get("return", "")
