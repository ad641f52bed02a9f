"""Compiles the per-request modules with mypyc: for the wheel (a hatchling build hook), and in
place for the development venv (`python hatch_build.py`, run by the Makefile).

Why: the relay's per-request work is Python (the llhttp callbacks, header rules, metrics, the
access line); compiled by mypyc from the same type-checked source it runs about 1.5x as many
requests per second on one core (issue 8, README "Performance"). The source stays the one
truth: where no extension is built, the same modules run as Python. A wheel built where mypyc
or a C compiler fails is pure Python, with a warning (AOAI_PROXY_REQUIRE_NATIVE=1, as the
Dockerfile sets, makes that an error; AOAI_PROXY_PURE_PYTHON=1 skips compiling). The test
suite runs against what `make` built: compiled, unless `make pure`.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SRC = Path(__file__).resolve().parent / "src"
PACKAGE = "aoai_auth_proxy"
# Every module a forwarded request runs through. Not: errors.py (exceptions must stay Python
# classes: see logs.NOT_NATIVE), websocket.py (a session's frames are the websockets
# library's work), and what runs once or per token rather than per request.
NATIVE = (
    "credentials",
    "forwarding",
    "health",
    "http1",
    "inbound",
    "lifecycle",
    "logs",
    "metrics",
    "readbuffer",
    "upstream",
)
# mypy's cache for these compiles (under the project's own .mypy_cache, ignored by git).
CACHE = ".mypy_cache/mypyc"
# The shared runtime module mypyc builds for the group: <GROUP>__mypyc.<ext>, top level.
GROUP = "aoai_auth_proxy_native"


def compile_native(build_lib: Path, *, inplace: bool = False) -> list[Path]:
    """Build the extensions of NATIVE; return the files built, relative to `build_lib`."""
    from mypyc.build import mypycify  # build-time only
    from setuptools import Distribution  # type: ignore[import-untyped]

    sources = [f"{PACKAGE}/{name}.py" for name in NATIVE]
    previous = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="mypyc-") as scratch:
        os.chdir(SRC)  # module names come from the package layout under src/
        try:
            # mypy type-checks with the project's configuration (strict): the build
            # environment needs the runtime dependencies installed, as the Dockerfile's
            # builder and `make native` have them. An isolated build (pip install . from
            # PyPI's sdist) lacks them: it fails here and the wheel is pure Python.
            options = [f"--cache-dir={SRC.parent / CACHE}"]
            extensions = mypycify(
                [*options, *sources], opt_level="3", group_name=GROUP, target_dir=scratch
            )
            distribution = Distribution({"name": PACKAGE, "ext_modules": extensions})
            command = distribution.get_command_obj("build_ext")
            command.build_temp = str(Path(scratch) / "temp")
            command.build_lib = str(build_lib)
            command.inplace = inplace
            command.ensure_finalized()
            command.run()
        finally:
            os.chdir(previous)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    built = [Path(PACKAGE) / f"{name}{suffix}" for name in NATIVE]
    return [Path(f"{GROUP}__mypyc{suffix}"), *built]


def remove_in_place() -> None:
    """Delete extensions built in place, so the package runs as Python again."""
    for path in [*SRC.glob("*.so"), *SRC.glob(f"{PACKAGE}/*.so")]:
        path.unlink()


class NativeBuildHook(BuildHookInterface[Any]):
    """Hatchling's custom build hook: the wheel carries the extensions next to the source."""

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "editable" or os.environ.get("AOAI_PROXY_PURE_PYTHON") == "1":
            return  # the Makefile builds a development tree's extensions in place
        build_lib = Path(tempfile.mkdtemp(prefix="aoai-native-"))
        self._build_lib = build_lib
        try:
            built = compile_native(build_lib)
        except (Exception, SystemExit) as exc:  # mypyc exits on a compile error
            if os.environ.get("AOAI_PROXY_REQUIRE_NATIVE") == "1":
                raise
            self.app.display_warning(f"mypyc could not compile; building pure Python: {exc}")
            return
        for relative in built:
            build_data["force_include"][str(build_lib / relative)] = str(relative)
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        build_lib = getattr(self, "_build_lib", None)
        if build_lib is not None:
            shutil.rmtree(build_lib, ignore_errors=True)


if __name__ == "__main__":
    remove_in_place()
    if sys.argv[1:] != ["--remove"]:
        try:
            compile_native(SRC, inplace=True)
        except (Exception, SystemExit) as exc:
            remove_in_place()
            sys.exit(
                f"hatch_build.py: compiling with mypyc failed ({exc}). It needs gcc and the "
                "Python headers (Debian: apt-get install gcc python3-dev); NATIVE=0 make ... "
                "runs the same modules as Python."
            )
