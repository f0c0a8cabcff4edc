"""infer.envs: the one table of environment variables, each read by its getter when called."""
import ast
from pathlib import Path

import pytest

from infer import envs

ROOT = Path(__file__).resolve().parents[1]


def test_no_library_module_reads_the_environment_itself():
    """Only envs.py reads os.environ / os.getenv (benchmarks may pass an environment to children)."""
    readers = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "benchmarks", "build") or rel.name == "envs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") \
                    and isinstance(node.value, ast.Name) and node.value.id == "os":
                readers.append(f"{rel}:{node.lineno}")
    assert not readers, readers


def test_every_infer_variable_named_in_the_source_is_in_the_table():
    names = set()
    for path in ROOT.rglob("*.py"):
        if path.relative_to(ROOT).parts[0] != "tests":
            names |= {n.value for n in ast.walk(ast.parse(path.read_text()))
                      if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith("INFER_")
                      and n.value.isupper() and " " not in n.value}
    assert names <= set(envs.ENV_VARS), names - set(envs.ENV_VARS)
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in envs.ENV_VARS)


def test_getters_read_when_called_and_name_bad_values(monkeypatch, tmp_path):
    monkeypatch.setenv("INFER_CACHE_DIR", str(tmp_path))
    assert envs.cache_dir() == tmp_path
    monkeypatch.delenv("INFER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert envs.cache_dir() == tmp_path / "xdg" / "infer"
    monkeypatch.setenv("INFER_COMPILE_CACHE_DIR", "")
    assert envs.compile_cache_dir("/default") is None
    monkeypatch.delenv("INFER_COMPILE_CACHE_DIR")
    assert envs.compile_cache_dir("/default") == "/default"
    monkeypatch.setenv("INFER_PDL", "0")
    assert envs.pdl() is False
    monkeypatch.setenv("INFER_PDL", "off")
    with pytest.raises(ValueError, match="INFER_PDL='off': expected 0 or 1"):
        envs.pdl()
    for value, on in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert envs.triton_interpret() is on
    with pytest.raises(KeyError, match="INFER_NOPE is not one of"):
        envs._raw("INFER_NOPE")
