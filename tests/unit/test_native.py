"""The mypyc build (hatch_build.py): what `make` compiled is what the suite tests, and no
compiled class carries the weak-reference hazard logs.NOT_NATIVE describes."""

from __future__ import annotations

import gc
import importlib
import inspect
import logging
import weakref
from pathlib import Path

import hatch_build
import pytest

import aoai_auth_proxy
from aoai_auth_proxy.credentials import Token
from aoai_auth_proxy.logs import BufferedAccessHandler, JsonFormatter

PACKAGE_DIR = Path(aoai_auth_proxy.__file__).parent
NATIVE_STAMP = PACKAGE_DIR / ".native"


def _classes(module_name: str) -> list[type]:
    module = importlib.import_module(f"aoai_auth_proxy.{module_name}")
    return [
        value
        for value in vars(module).values()
        if inspect.isclass(value) and value.__module__ == module.__name__
    ]


@pytest.mark.skipif(not NATIVE_STAMP.exists(), reason="make pure: the modules run as Python")
@pytest.mark.parametrize("name", hatch_build.NATIVE)
def test_make_native_compiled_every_listed_module(name: str) -> None:
    module = importlib.import_module(f"aoai_auth_proxy.{name}")
    assert module.__file__ is not None
    assert module.__file__.endswith(".so"), f"{name} runs as Python after make native"


@pytest.mark.parametrize("name", hatch_build.NATIVE)
def test_no_compiled_class_is_both_native_and_weakly_referenceable(name: str) -> None:
    # mypyc marks its native classes with __mypyc_attrs__; one that also has a weak-reference
    # slot (a Python base such as an exception or a logging class gives it one) crashes the
    # process once such an object dies with a weak reference to it. typing.Protocol classes
    # are never instantiated.
    hazards = [
        cls.__qualname__
        for cls in _classes(name)
        if "__mypyc_attrs__" in cls.__dict__
        and cls.__weakrefoffset__
        and not getattr(cls, "_is_protocol", False)
    ]
    assert hazards == [], f"mark these @mypyc_attr(native_class=False): {hazards}"


def test_logging_objects_die_cleanly_with_weak_references_to_them() -> None:
    # What logging itself does with every handler (logging._handlers, the at-fork weak set).
    handler = BufferedAccessHandler(interval=0.01)
    handler.close()
    objects: list[object] = [handler, JsonFormatter()]
    references = [weakref.ref(item) for item in objects]
    del objects, handler
    logging.getLogger("test-native").handlers[:] = []
    for _ in range(200):  # until the flusher thread has seen the stop and let go
        gc.collect()
        if all(reference() is None for reference in references[1:]):
            break
    assert [reference() for reference in references[1:]] == [None]


class _NoFetch:
    async def fetch(self) -> Token:
        raise AssertionError("not asked")


async def test_the_compiled_classes_the_package_exports_take_python_subclasses() -> None:
    # A class mypyc compiles refuses Python subclasses (a TypeError once one is instantiated)
    # unless it allows them; the package's exports keep working as they did when their module
    # ran as Python, overrides included.
    class Pinned(aoai_auth_proxy.RefreshingTokenSource):
        def held(self) -> str | None:
            return "pinned"

    class Status(aoai_auth_proxy.TokenStatus):
        pass

    source = Pinned(_NoFetch())
    assert source.held() == "pinned"
    assert source.status() == aoai_auth_proxy.TokenStatus(False, None, None)
    assert Status(True, None, None).ready is True
