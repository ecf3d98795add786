"""Print the HTML report to PDF, or take a screenshot of it, with headless Chromium.

Chromium is looked up as /usr/bin/chromium (Debian's `chromium` package), then on PATH under
its usual names. Each call starts a fresh browser with a throwaway profile and no background
networking, and loads only the local file.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--no-first-run", "--no-default-browser-check", "--disable-extensions")


class ChromiumError(RuntimeError):
    """Chromium is missing, failed, or did not write its output."""


class ReportFileError(ValueError):
    """An HTML report path that does not name a readable file."""


def find_chromium(executable: str | Path | None = None) -> str:
    """Return the path of a Chromium executable, or raise ChromiumError saying how to get one."""
    if executable is not None:
        found = shutil.which(str(executable))
        if found is None:
            raise ChromiumError(f"Chromium executable {executable} was not found or is not "
                                "executable")
        return found
    for name in CANDIDATES:
        found = shutil.which(name)
        if found is not None:
            return found
    raise ChromiumError("Chromium was not found (looked for /usr/bin/chromium, chromium, "
                        "chromium-browser, google-chrome); install it with "
                        "`apt-get install chromium` to print reports to PDF")


def _run_chromium(html_path: Path, output_flags: list[str], output: Path,
                  executable: str | Path | None, timeout_s: float) -> Path:
    html_path = Path(html_path)
    if not html_path.is_file():
        raise ReportFileError(f"HTML report {html_path} does not exist or is not a file")
    chromium = find_chromium(executable)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.exists():
        output.unlink()

    with tempfile.TemporaryDirectory(prefix="clinaudit-chromium-") as profile:
        command = [chromium, *FLAGS, f"--user-data-dir={profile}", *output_flags,
                   html_path.resolve().as_uri()]
        try:
            completed = subprocess.run(command, capture_output=True, text=True,
                                       timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise ChromiumError(f"Chromium timed out after {timeout_s} s on {html_path}") from None
    if completed.returncode != 0 or not output.is_file() or output.stat().st_size == 0:
        last_line = (completed.stderr.strip().splitlines() or ["no error output"])[-1]
        raise ChromiumError(f"Chromium failed to write {output} (exit code "
                            f"{completed.returncode}): {last_line}")
    return output


def html_to_pdf(html_path: Path, pdf_path: Path, *, executable: str | Path | None = None,
                timeout_s: float = 120.0) -> Path:
    """Print `html_path` to `pdf_path` with Chromium's print engine, without header or footer.

    Raises ReportFileError when the HTML file is missing and ChromiumError when Chromium is not
    installed, fails or times out. Returns `pdf_path`.
    """
    pdf_path = Path(pdf_path)
    flags = [f"--print-to-pdf={pdf_path.resolve()}", "--no-pdf-header-footer"]
    return _run_chromium(Path(html_path), flags, pdf_path, executable, timeout_s)


def html_to_png(html_path: Path, png_path: Path, *, width: int = 1280, height: int = 900,
                executable: str | Path | None = None, timeout_s: float = 120.0) -> Path:
    """Save a screenshot of the first `width` x `height` pixels of the page in `html_path`."""
    if width <= 0 or height <= 0:
        raise ReportFileError(f"screenshot size must be positive, got {width}x{height}")
    png_path = Path(png_path)
    flags = [f"--screenshot={png_path.resolve()}", f"--window-size={width},{height}",
             "--hide-scrollbars"]
    return _run_chromium(Path(html_path), flags, png_path, executable, timeout_s)
