"""scripts/install.sh waits for a busy apt lock and says what it is doing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "install.sh"


def test_a_busy_apt_lock_is_waited_for(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "env", "sleep", "id", "grep", "dirname", "cat"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    calls = tmp_path / "calls"
    # apt-get fails twice as with a held lock, then works; no espeak-ng or ffprobe on PATH.
    (bin_dir / "apt-get").write_text(
        f'#!{shutil.which("bash")}\necho "$*" >> {calls}\n'
        f'[ "$(grep -c . {calls})" -gt 2 ] || {{ echo "E: Could not get lock" >&2; exit 100; }}\n'
    )
    # A Python that is too old stops the script right after the system packages.
    (bin_dir / "python3").write_text(f"#!{shutil.which('bash')}\nexit 1\n")
    for stub in ("apt-get", "python3"):
        (bin_dir / stub).chmod(0o755)
    env = {"PATH": str(bin_dir), "APT_RETRY_EVERY": "0", "APT_LOCK_WAIT": "60", "HOME": str(tmp_path)}
    if os.getuid() != 0:
        (bin_dir / "sudo").write_text(f'#!{shutil.which("bash")}\nexec "$@"\n')
        (bin_dir / "sudo").chmod(0o755)
    proc = subprocess.run([shutil.which("bash"), str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    lines = calls.read_text().splitlines()
    assert [line.split()[-1] for line in lines[:3]] == ["-q", "-q", "-q"] and "update" in lines[0]
    assert "install" in lines[-1] and "espeak-ng" in lines[-1] and "ffmpeg" in lines[-1]
    assert all("DPkg::Lock::Timeout=60" in line for line in lines)
    assert proc.stdout.count("retrying") == 2
    assert "==> updating the apt package lists" in proc.stdout and "==> installing system packages" in proc.stdout
    assert proc.returncode == 1 and "Python 3.11 or newer is needed" in proc.stderr
