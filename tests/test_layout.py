"""The layering of the product, held: every import goes down (or across) the layers, never up; the
product never reads tests/; bench/ and tests/ import the product, not each other; the project reaches
models/handler.py only through models/transforms.py (the handler itself imports nothing of the project).

Layers, lowest first (README, Layout):
  0  models/ (registry, networks, checkpoints, inference, the handler), deployment/readiness.py
  1  dataset.py, parsers/
  2  training/, evaluation/, serving/
  3  train.py
  4  the entry points: train_main.py, predict_main.py, evaluate_main.py, export_main.py
"""
import ast
import os

import pytest

from tests.support import REPO_ROOT

LAYER = {"models": 0, "deployment": 0, "dataset": 1, "parsers": 1, "training": 2, "evaluation": 2, "serving": 2,
         "train": 3, "train_main": 4, "predict_main": 4, "evaluate_main": 4, "export_main": 4}
PACKAGES = ("models", "parsers", "training", "evaluation", "serving", "deployment")


def python_files(*folders):
    for folder in folders:
        for root, dirs, names in os.walk(os.path.join(REPO_ROOT, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in sorted(names):
                if name.endswith(".py"):
                    yield os.path.relpath(os.path.join(root, name), REPO_ROOT)


def product_files():
    root_modules = [name for name in sorted(os.listdir(REPO_ROOT)) if name.endswith(".py")]
    return root_modules + list(python_files(*PACKAGES))


def top_level(path):
    """The layer name of a product file: its package, or its module name at the root."""
    first = path.split(os.sep)[0]
    return first[:-3] if first.endswith(".py") else first


def imports(path):
    """(line, top-level name, full dotted name) of every absolute import of a file, at any depth."""
    with open(os.path.join(REPO_ROOT, path)) as f:
        tree = ast.parse(f.read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0], alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0], node.module


def test_every_root_module_and_package_has_a_layer():
    assert set(map(top_level, product_files())) == set(LAYER)


@pytest.mark.parametrize("path", product_files())
def test_no_import_runs_up_a_layer_or_into_tests_or_bench(path):
    own = LAYER[top_level(path)]
    for line, name, full in imports(path):
        assert name not in ("tests", "bench"), "%s:%d imports %s" % (path, line, full)
        if name in LAYER:
            assert LAYER[name] <= own, "%s:%d (layer %d) imports %s (layer %d)" % (path, line, own, full, LAYER[name])


def _strings_outside_docstrings(tree):
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


@pytest.mark.parametrize("path", product_files())
def test_the_product_reads_nothing_under_tests(path):
    with open(os.path.join(REPO_ROOT, path)) as f:
        tree = ast.parse(f.read(), filename=path)
    for node in _strings_outside_docstrings(tree):
        assert node.value != "tests" and "tests/" not in node.value, "%s:%d names %r" % (path, node.lineno, node.value)


def test_the_handler_is_reached_only_through_transforms_and_imports_nothing_of_the_project():
    for path in product_files():
        for line, _, full in imports(path):
            if full == "models.handler":
                assert path == os.path.join("models", "transforms.py"), "%s:%d imports models.handler" % (path, line)
    project = set(LAYER) | {"tests", "bench"}
    assert not [full for _, name, full in imports(os.path.join("models", "handler.py")) if name in project]


@pytest.mark.parametrize("path", list(python_files("bench")))
def test_bench_imports_the_product_not_the_tests(path):
    assert not [full for _, name, full in imports(path) if name == "tests"]


@pytest.mark.parametrize("path", list(python_files("tests")))
def test_tests_import_the_product_not_bench(path):
    assert not [full for _, name, full in imports(path) if name == "bench"]
