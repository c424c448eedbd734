"""The layers import in one direction: no import cycle among imagegen's modules, counting the imports
written inside functions too (a lazy import that closes a cycle is still a cycle), and the package root,
which imports everything, is imported by no module of the package."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "imagegen"


def modules(root: Path) -> dict[str, Path]:
    """{dotted name: file} of every module of the package at root (a package is its __init__.py)."""
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, from every import statement in its source, wherever
    it stands. `from . import x` counts as importing x where x is a module, else the package itself."""
    mods = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = (package[:len(package) - node.level + 1] if node.level else [])
                target = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:           # imagegen.data.registry.load_data -> imagegen.data.registry
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_imagegen_has_no_import_cycle():
    assert cycles(import_graph(PACKAGE)) == []


def test_no_module_imports_the_package_root():
    graph = import_graph(PACKAGE)
    assert sorted(m for m, targets in graph.items() if "imagegen" in targets) == []


def test_the_check_finds_a_cycle_closed_by_a_lazy_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import f\n")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import g\n    from . import c\n")
    (pkg / "sub" / "c.py").write_text("import os\n")
    graph = import_graph(pkg)
    assert graph["pkg.sub.b"] == {"pkg.a", "pkg.sub.c"} and graph["pkg.a"] == {"pkg.sub.b"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]


# --- a family's abilities are declared, not discovered ------------------------------------------------------

# Each declared ability (models/base.py) and the methods a family that declares it implements.
ABILITIES = {"has_latent": ("draw_noise", "latent_network"), "encodes": ("encode", "reconstruct"),
             "edits": ("edit",), "inpaints": ("inpaint",), "has_critic": ("critic",),
             "has_likelihood": ("log_likelihood", "likelihood_estimator"), "distillable": ("from_noise",),
             "autoencodes": ("to_latent", "from_latent", "round_trip"), "validates": ("validation_loss",)}


def test_each_family_declares_exactly_the_abilities_it_implements():
    from imagegen.models import REGISTRY
    from imagegen.models.base import Family
    for name, cls in REGISTRY.items():
        own = set().union(*(vars(k) for k in cls.__mro__ if issubclass(k, Family) and k is not Family))
        for ability, methods in ABILITIES.items():
            assert getattr(cls, ability) == all(m in own for m in methods), (name, ability)
            assert getattr(cls, ability) or not any(m in own for m in methods), (name, ability, "half of it")


def _family_names() -> set[str]:
    from imagegen.models import REGISTRY
    return set(REGISTRY)


def outside_the_families(root: Path = PACKAGE) -> list[str]:
    """Lines outside models/ that discover a model's abilities (`hasattr(model...)`, `getattr(model..., d)`)
    or compare a family's name (`run.family == "vae"`, `model.name in ("ddpm", ...)`)."""
    names = _family_names()
    found = []
    for path in sorted(root.rglob("*.py")):
        if "models" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args and (
                    node.func.id == "hasattr" or (node.func.id == "getattr" and len(node.args) == 3)):
                if "model" in ast.unparse(node.args[0]):
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                literals = {c.value for s in sides for c in ([s] if isinstance(s, ast.Constant) else
                            s.elts if isinstance(s, (ast.Tuple, ast.List, ast.Set)) else [])
                            if isinstance(c, ast.Constant)}
                about = any("family" in ast.unparse(s) or ast.unparse(s).endswith(".name") for s in sides)
                if about and literals & names:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_code_outside_models_discovers_abilities_or_compares_family_names():
    assert outside_the_families() == []


def test_the_rule_sees_both_kinds(tmp_path):
    pkg = tmp_path / "imagegen"
    (pkg / "models").mkdir(parents=True)
    (pkg / "models" / "ok.py").write_text("x = hasattr(model, 'encode')\n")
    (pkg / "a.py").write_text("if hasattr(run.model, 'encode') or run.family == 'cvae':\n    pass\n"
                              "y = getattr(served.model.cfg, 'solver', None)\nz = name == 'random'\n"
                              "w = model.name in ('ddpm', 'flow')\n")
    assert sorted(line.split(": ", 1)[0] for line in outside_the_families(pkg)) == ["imagegen/a.py:1"] * 2 + \
        ["imagegen/a.py:3", "imagegen/a.py:5"]


def test_no_module_imports_another_modules_private_names():
    private = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                private += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert private == []


def test_a_familys_sampling_options_reach_every_front_end():
    """sample_options is the one source: each family's options are CLI flags, fields of the HTTP bodies
    with the same bounds, entries of GET /api/models with the page's control, and the page's script
    names none of them; the studio trains the families that declare it."""
    from imagegen.cli import build_parser
    from imagegen.models import REGISTRY, SAMPLE_OPTIONS
    from imagegen.serve.common import GenerateRequest, OptionInfo
    from imagegen.serve.jobs import TRAIN_FAMILIES

    sample = build_parser().parse_args(["sample", "RUN", "--out", "OUT"])
    script = (PACKAGE / "static" / "app.js").read_text(encoding="utf-8")
    for cls in REGISTRY.values():
        for name, opt in cls.sample_options.items():
            assert hasattr(sample, name), f"--{name} of {cls.name} is not a flag of `imagegen sample`"
            merged = SAMPLE_OPTIONS[name]
            assert merged.kind is opt.kind
            if opt.range is not None:
                assert merged.range.lo <= opt.range.lo and opt.range.hi <= merged.range.hi
            else:
                assert set(opt.choices) <= set(merged.choices)
            if opt.served:
                field = GenerateRequest.model_fields[name]
                assert field.description == merged.help
                OptionInfo(**opt.control())          # what /api/models answers for it
                assert f'"{name}"' not in script and f"'{name}'" not in script, f"app.js names the option {name}"
            else:
                assert name not in GenerateRequest.model_fields
    assert TRAIN_FAMILIES == tuple(n for n, c in REGISTRY.items() if c.trains_in_studio)
    assert "dcgan" in TRAIN_FAMILIES and "cyclegan" not in TRAIN_FAMILIES
