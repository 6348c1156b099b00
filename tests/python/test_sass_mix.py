"""scripts/sass_mix.py's parsing of nvdisasm output (no GPU, no nvdisasm needed)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

spec = importlib.util.spec_from_file_location("sass_mix", os.path.join(ROOT, "scripts", "sass_mix.py"))
sass_mix = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sass_mix)

# The shape of `nvdisasm -c` output: a kernel section, labels, predicated
# instructions, one loop (a backward branch) holding two HMMA, and a forward
# branch that is not a loop.
SASS = """
        .text._Z6kernelv:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/               @P0 BRA `(.L_x_2) ;
.L_x_1:
        /*0020*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*0030*/                   LOP3.LUT R8, R4, 0xf000f, RZ, 0xc0, !PT ;
        /*0040*/                   HMMA.16816.F32.BF16 R12, R8, R16, R12 ;
        /*0050*/                   HMMA.16816.F32.BF16 R20, R8, R18, R20 ;
        /*0060*/                   ISETP.NE.AND P1, PT, R0, RZ, PT ;
        /*0070*/              @!P1 BRA `(.L_x_1) ;
.L_x_2:
        /*0080*/                   EXIT ;
        .text._Z5otherv:
        /*0000*/                   EXIT ;
"""


def test_parse_kernels_and_histogram():
    kernels = sass_mix.parse(SASS)
    assert list(kernels) == ["_Z6kernelv", "_Z5otherv"]
    h = sass_mix.histogram(kernels["_Z6kernelv"])
    assert h["HMMA"] == 2 and h["BRA"] == 2 and h["LDG"] == 1 and h["EXIT"] == 1
    assert sum(h.values()) == 9  # labels are not instructions


def test_loops_are_backward_branches():
    instrs = sass_mix.parse(SASS)["_Z6kernelv"]
    loops = sass_mix.loops(instrs)
    assert len(loops) == 1  # the forward branch to .L_x_2 is not a loop
    first, last = loops[0]
    body = sass_mix.histogram(instrs[first:last + 1])
    assert body["HMMA"] == 2 and body["LDG"] == 1 and body["MOV"] == 0
    assert sum(body.values()) == 6
