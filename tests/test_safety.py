"""Nothing unsafe to load (issue 17): no pickle anywhere, NumPy loads with allow_pickle=False
(explicitly, everywhere), no eval/exec, Keras models load in safe mode.

The source is read as Python (ast), so comments, docstrings and strings that mention these
words do not count, and real uses are found whatever their layout (calls split over lines,
aliases such as `import numpy as xp` or `from numpy import load`). The scanner is shown to
catch each rule on planted code.
"""

import ast
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO

SCANNED = ("brats_tf", "data_prep", "bench", "run_experiment.py")

# Modules whose loading runs arbitrary code from the data (pickle and its relatives).
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
# Methods that unpickle whatever object they are called on.
UNSAFE_METHODS = {"read_pickle", "to_pickle", "enable_unsafe_deserialization", "unsafe_load",
                  "unsafe_load_all"}
NUMPY_LOADERS = {"load"}          # np.load (np.fromfile / np.frombuffer never unpickle)


def scan_source(text, filename="<planted>"):
    """Violations in one module's source, as "file:line: rule" strings."""
    tree = ast.parse(text, filename=filename)
    numpy_names = {"np", "numpy"}             # module aliases (conservative: assumed numpy)
    numpy_loads = set()                       # `from numpy import load [as x]`
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            numpy_names |= {a.asname or a.name for a in node.names if a.name == "numpy"}
        elif isinstance(node, ast.ImportFrom) and node.module == "numpy":
            numpy_loads |= {a.asname or a.name for a in node.names if a.name in NUMPY_LOADERS}
    found = []

    def report(node, rule):
        found.append(f"{filename}:{node.lineno}: {rule}")

    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for name in names:
                if name.split(".")[0] in UNSAFE_MODULES:
                    report(node, f"imports {name} (loading it runs code from the data)")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
        keywords = {k.arg: k.value for k in node.keywords}
        if (isinstance(func, ast.Name) and name in ("eval", "exec")) or (owner == "builtins" and name in ("eval", "exec")):
            report(node, f"calls {name}()")
        if name in ("__import__", "import_module") and node.args and isinstance(node.args[0], ast.Constant) \
                and str(node.args[0].value).split(".")[0] in UNSAFE_MODULES:
            report(node, f"imports {node.args[0].value} dynamically")
        if name in UNSAFE_METHODS:
            report(node, f"calls {name}()")
        if owner == "yaml" and name in ("load", "load_all") and not _is_name(keywords.get("Loader"), "SafeLoader", "CSafeLoader"):
            report(node, f"yaml.{name} without Loader=yaml.SafeLoader")
        if "allow_pickle" in keywords and not _is_constant(keywords["allow_pickle"], False):
            report(node, "allow_pickle is not False")
        is_numpy_load = (owner in numpy_names and name in NUMPY_LOADERS) or \
                        (isinstance(func, ast.Name) and name in numpy_loads)
        if is_numpy_load and "allow_pickle" not in keywords:
            report(node, f"{owner or name}.load without allow_pickle=False" if owner else
                   f"{name}() (numpy.load) without allow_pickle=False")
        if "safe_mode" in keywords and not _is_constant(keywords["safe_mode"], True):
            report(node, "safe_mode is not True (Keras unsafe deserialization)")
        if None in keywords and (is_numpy_load or name == "load_model"):
            report(node, f"{name}(**kwargs): cannot check allow_pickle / safe_mode")
    return found


def _is_constant(node, value):
    return isinstance(node, ast.Constant) and node.value is value


def _is_name(node, *names):
    return (isinstance(node, ast.Attribute) and node.attr in names) or (isinstance(node, ast.Name) and node.id in names)


def scan_tree(root, parts=SCANNED):
    """Every violation in the scanned parts of a source tree."""
    found = []
    for part in parts:
        path = Path(root) / part
        files = [path] if path.is_file() else sorted(path.rglob("*.py")) if path.is_dir() else []
        for file in files:
            found += scan_source(file.read_text(encoding="utf-8"), str(file.relative_to(root)))
    return found


def test_the_package_loads_nothing_unsafely():
    assert (REPO / "brats_tf").is_dir() and (REPO / "run_experiment.py").is_file()
    found = scan_tree(REPO)
    assert not found, "unsafe loading:\n" + "\n".join(found)


PLANTED = {
    "import pickle": "imports pickle",
    "import numpy, cloudpickle as cp": "imports cloudpickle",
    "from joblib import load": "imports joblib",
    "from pickle import loads as l": "imports pickle",
    "m = __import__('pickle')": "imports pickle dynamically",
    "m = importlib.import_module('dill')": "imports dill dynamically",
    "x = eval(text)": "calls eval()",
    "exec(code, {})": "calls exec()",
    "builtins.eval('1')": "calls eval()",
    "a = np.load(path)": "np.load without allow_pickle=False",
    "a = np.load(\n    path,\n    mmap_mode='r')": "np.load without allow_pickle=False",
    "import numpy as xp\na = xp.load(path)": "xp.load without allow_pickle=False",
    "from numpy import load as npl\na = npl(path)": "npl() (numpy.load) without allow_pickle=False",
    "a = np.load(path, allow_pickle=True)": "allow_pickle is not False",
    "a = np.load(path, allow_pickle=flag)": "allow_pickle is not False",
    "np.save(path, a, allow_pickle=True)": "allow_pickle is not False",
    "a = np.load(path, **options)": "cannot check allow_pickle",
    "m = keras.models.load_model(path, safe_mode=False)": "safe_mode is not True",
    "m = keras.saving.load_model(\n  path,\n  compile=False,\n  safe_mode=False,\n)": "safe_mode is not True",
    "m = load_model(path, **kw)": "cannot check allow_pickle / safe_mode",
    "keras.config.enable_unsafe_deserialization()": "calls enable_unsafe_deserialization()",
    "df = pd.read_pickle(path)": "calls read_pickle()",
    "d = yaml.load(f)": "yaml.load without Loader=yaml.SafeLoader",
    "d = yaml.unsafe_load(f)": "calls unsafe_load()",
}


@pytest.mark.parametrize("code", sorted(PLANTED))
def test_each_planted_violation_is_caught(code):
    found = scan_source(code, "planted.py")
    assert any(PLANTED[code] in line for line in found), (code, found)
    line = next(line for line in found if PLANTED[code] in line)
    assert line.startswith("planted.py:") and int(line.split(":")[1]) >= 1


def test_mentions_and_safe_uses_are_not_violations():
    clean = textwrap.dedent('''
        """Never use pickle or eval( here; np.load(path) without allow_pickle=False is banned,
        and so is keras.models.load_model(path, safe_mode=False)."""
        import ast
        import numpy as np
        # import pickle  -- a comment mentioning exec( and safe_mode=False
        MESSAGE = "pickle, eval(, exec(, allow_pickle=True, safe_mode=False"
        a = np.load(path, allow_pickle=False)
        with np.load(
                path,
                allow_pickle=False) as z:
            pass
        np.save(path, a, allow_pickle=False)
        value = ast.literal_eval(text)
        m = keras.models.load_model(path)
        m = keras.models.load_model(path, compile=False, safe_mode=True)
        d = yaml.load(f, Loader=yaml.SafeLoader)
        model.evaluate(x)
        json.load(f)
    ''')
    assert scan_source(clean) == []


def test_a_violation_planted_in_a_copy_of_the_tree_fails_the_scan(tmp_path):
    """The walk covers every scanned part (a file deep in a subpackage, the entry point)."""
    (tmp_path / "brats_tf" / "inference").mkdir(parents=True)
    (tmp_path / "brats_tf" / "inference" / "ok.py").write_text("import numpy as np\nnp.load(p, allow_pickle=False)\n")
    (tmp_path / "brats_tf" / "inference" / "bad.py").write_text("import json\n\nx = eval(s)\n")
    (tmp_path / "run_experiment.py").write_text("import pickle\n")
    assert scan_tree(tmp_path) == ["brats_tf/inference/bad.py:3: calls eval()",
                                   "run_experiment.py:1: imports pickle (loading it runs code from the data)"]
