"""The console scripts of `pyproject.toml` ([project.scripts]): each runs one main module
exactly as `python -m MODULE` does (`runpy`, the machinery behind `-m`), so a script and
its `python -m` form cannot drift apart, and a main module needs nothing beyond its usual
`if __name__ == "__main__": app.run(run_main(main))`.

Mains are named by string, never imported here: nothing imports an entry point
(`[tool.importlinter]`), and a script imports only the main it runs."""

import runpy

# console script -> the main module it runs (README "Commands" lists both forms)
SCRIPTS = {
    "brats-segment": "brats_tf.segment",
    "brats-train": "brats_tf.train",
    "brats-evaluate": "brats_tf.evaluate",
    "brats-fuse": "brats_tf.fuse",
    "brats-compare": "brats_tf.compare",
    "brats-export": "brats_tf.export",
    "brats-experiment": "brats_tf.experiment",
    "brats-launch": "brats_tf.launch",
    "brats-check-dataset": "data_prep.check_dataset",
    "brats-build-records": "data_prep.build_records",
}


def run_module(module):
    """Runs `module` as `__main__`, with `sys.argv[0]` set to its file (as `python -m`)."""
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _script(name):
    def main():
        run_module(SCRIPTS[name])
    main.__doc__ = f"`{name}`: the same as `python -m {SCRIPTS[name]}`."
    return main


segment = _script("brats-segment")
train = _script("brats-train")
evaluate = _script("brats-evaluate")
launch = _script("brats-launch")
fuse = _script("brats-fuse")
compare = _script("brats-compare")
export = _script("brats-export")
experiment = _script("brats-experiment")
check_dataset = _script("brats-check-dataset")
build_records = _script("brats-build-records")
