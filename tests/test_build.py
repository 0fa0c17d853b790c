"""Tier 1: properties of the built extension that no kernel test can see.

Each CPU instruction set is its own translation unit, compiled with that set's -m flags. An inline
function of a shared header that the compiler emits out of line in such a unit is a weak (COMDAT)
symbol, and the linker keeps one copy for every caller: an AVX-512 build of it could end up called
from the AVX2 or scalar path, and fault on a CPU without AVX-512. So the ISA objects must export no
weak symbol of int4kit's own (headers meant for them use internal linkage, act_quant.h for one)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ISA_OBJECTS = ("linear_avx2", "linear_avx512", "linear_amx")

needs_nm = pytest.mark.skipif(shutil.which("nm") is None or shutil.which("c++") is None,
                              reason="binutils nm and a C++ compiler are needed")


def shared_inline_symbols(obj: Path):
    """int4kit symbols that `obj` defines weakly (out-of-line copies of inline code)."""
    out = subprocess.run(["nm", "-C", str(obj)], check=True, capture_output=True, text=True).stdout
    return [line for line in out.splitlines()
            if len(line.split(maxsplit=2)) == 3 and line.split(maxsplit=2)[1] in ("W", "V")
            and "int4kit::" in line]


@needs_nm
def test_detector_sees_an_out_of_line_inline_function(tmp_path):
    src = tmp_path / "probe.cpp"
    src.write_text("namespace int4kit { __attribute__((noinline)) inline int twice(int v) "
                   "{ return 2 * v; } }\nint use(int v) { return int4kit::twice(v); }\n")
    obj = tmp_path / "probe.o"
    subprocess.run(["c++", "-O2", "-c", str(src), "-o", str(obj)], check=True)
    assert any("int4kit::twice" in line for line in shared_inline_symbols(obj))


@needs_nm
def test_isa_objects_share_no_inline_code():
    objects = [p for name in ISA_OBJECTS for p in ROOT.glob(f"build/temp*/csrc/cpu/{name}.o")]
    if not objects:
        pytest.skip("the extension was not built in this checkout (no build/temp*/ objects)")
    for obj in objects:
        assert shared_inline_symbols(obj) == [], obj.name
