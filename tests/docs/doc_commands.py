"""Run the fenced ```bash blocks of a Markdown document, as written.

A block may be preceded by a marker comment, invisible on the rendered page:

- ``<!-- doc-test: skip (why) -->``: not run (an install step);
- ``<!-- doc-test: background -->``: each command line is a long-running server,
  started in the background and stopped by its PID at the end.

Every other block runs as one ``bash -euo pipefail`` script in the test's folder.
The only changes a test may make are to addresses and ports (``Doc.substitute``),
because the document's defaults may be taken on a shared machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fedscale.processes import start, stop

ROOT = Path(__file__).resolve().parents[2]
_FENCE = re.compile(r"^```bash[ \t]*$\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_MARKER = re.compile(r"<!--\s*doc-test:\s*(\w+)[^>]*-->\s*\Z")


@dataclass(frozen=True)
class Block:
    """One fenced bash block, its marker (``run``, ``skip``, ``background``) and position."""

    text: str
    marker: str
    line: int

    def commands(self) -> list[str]:
        """Return its command lines, continuations joined, comments and blanks left out."""
        joined = re.sub(r"\\\n\s*", "", self.text)
        return [c for c in joined.splitlines() if c.strip() and not c.lstrip().startswith("#")]


def bash_blocks(path: Path, *, before_heading: str | None = None) -> list[Block]:
    """Return the ```bash blocks of ``path`` in order, with their markers.

    With ``before_heading``, only the blocks above that heading line (a section
    that another test covers starts there).
    """
    text = path.read_text(encoding="utf-8")
    if before_heading is not None:
        lines = text.splitlines(keepends=True)
        cut = lines.index(before_heading + "\n")
        text = "".join(lines[:cut])
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip()
        marker = _MARKER.search(before[-200:])
        blocks.append(
            Block(
                text=match.group(1),
                marker=marker.group(1) if marker else "run",
                line=text.count("\n", 0, match.start()) + 1,
            )
        )
    return blocks


@dataclass
class Doc:
    """A document's commands, run in ``folder`` with ``substitute`` applied to them."""

    path: Path
    folder: Path
    substitute: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 120.0
    outputs: list[str] = field(default_factory=list)
    """The combined output of each foreground block, in order."""

    def env(self) -> dict[str, str]:
        """Return an environment whose ``fedscale`` and ``python`` are this test's."""
        bin_dir = str(Path(sys.executable).parent)
        return {
            **os.environ,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "FLWR_HOME": str(self.folder / ".flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "COLUMNS": "200",  # rich wraps at the terminal's width; keep lines whole
        }

    def render(self, text: str, substitute: Mapping[str, str] | None = None) -> str:
        """Apply the address and port substitutions (whole words only)."""
        for old, new in (self.substitute if substitute is None else substitute).items():
            text = re.sub(rf"(?<![\w.]){re.escape(old)}(?![\w])", new, text)
        return text

    def run_block(
        self,
        block: Block,
        *,
        substitute: Mapping[str, str] | None = None,
        folder: Path | None = None,
    ) -> str:
        """Run a foreground block to its end; return its output or fail with it.

        ``substitute`` and ``folder`` replace the document's for this block (a
        command run on another host of the document).
        """
        index = len(self.outputs)
        log = self.folder / f".block-{index}.log"
        script = self.render(block.text, substitute)
        cwd = folder or self.folder
        cwd.mkdir(parents=True, exist_ok=True)
        process = start(
            ["bash", "-euo", "pipefail", "-c", script],
            log_file=log,
            env=self.env(),
            cwd=cwd,
        )
        try:
            code = process.wait(timeout=self.timeout)
        finally:
            stop(process)
        output = log.read_text(encoding="utf-8", errors="replace")
        assert code == 0, f"{self.path.name} line {block.line} exited {code}:\n{script}\n{output}"
        self.outputs.append(output)
        return output

    @contextmanager
    def background(
        self,
        block: Block,
        *,
        substitutes: Sequence[Mapping[str, str]] | None = None,
        folders: Sequence[Path] | None = None,
    ) -> Iterator[list[tuple[subprocess.Popen[bytes], Path]]]:
        """Start each command of a background block; stop every one by PID on leaving.

        The n-th command gets ``substitutes[n]`` and runs in ``folders[n]`` when
        given (each line of the block is another host of the document).
        """
        started: list[tuple[subprocess.Popen[bytes], Path]] = []
        try:
            for number, command in enumerate(block.commands()):
                log = self.folder / f".background-{block.line}-{number}.log"
                cwd = folders[number] if folders else self.folder
                cwd.mkdir(parents=True, exist_ok=True)
                process = start(
                    [
                        "bash",
                        "-c",
                        "exec " + self.render(command, substitutes and substitutes[number]),
                    ],
                    log_file=log,
                    env=self.env(),
                    cwd=cwd,
                )
                started.append((process, log))
            yield started
        finally:
            for process, _ in reversed(started):
                stop(process)
