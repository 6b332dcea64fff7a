"""Every backend checks the graph / engine it loads against the manifest's contract (model/contracts.py)."""
from __future__ import annotations

from qwen_vl_trt.model.errors import ArtifactError


def check_io(contract, inputs: dict, outputs: dict, where: str) -> None:
    """`inputs`/`outputs`: name -> (dtype name, rank) as found in the graph/engine; raise on any difference."""
    problems = []
    for kind, specs, found in (("input", contract.inputs, inputs), ("output", contract.outputs, outputs)):
        expected = {t.name: (t.dtype, len(t.dims)) for t in specs}
        problems += [f"{kind} {n} missing" for n in expected if n not in found]
        problems += [f"unexpected {kind} {n}" for n in found if n not in expected]
        problems += [f"{kind} {n} is {found[n][0]} rank {found[n][1]}, contract says {e[0]} rank {e[1]}"
                     for n, e in expected.items() if n in found and tuple(found[n]) != e]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ArtifactError(f"{where} does not match the manifest contract of the {contract.name} graph: "
                            f"{'; '.join(problems[:3])}{more}; re-run export_all.sh for these artifacts")
