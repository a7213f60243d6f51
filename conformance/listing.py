"""``--list-backends`` and ``attn-conformance list-backends``: every known backend, whether it is
available here and why not, with its whole declaration (read in the kernel's process)."""

from __future__ import annotations

from conformance import isolation


def backend_listing(runner=None) -> list[str]:
    runner = runner or isolation.Isolated()
    try:
        rows = isolation.describe_known(runner)
    finally:
        runner.close()
    lines = []
    for row in rows:
        reasons = [row.error] if row.backend is None else row.unavailable
        lines.append(f"{row.spec:<15} " + ("available" if not reasons else "unavailable: " + "; ".join(reasons)))
        if row.backend is not None:
            if row.backend.description:
                lines.append(f"{'':<15} {row.backend.description}")
            lines.append(f"{'':<15} {row.backend.capabilities.summary()}")
    return lines
