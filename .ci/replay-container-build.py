"""Replays the build stage of deploy/container/Dockerfile without a container
engine (run by .ci/run): copies exactly what the stage's COPY lines name
into an empty directory standing for its WORKDIR and runs its RUN commands
there, as `docker build` would. Then checks that the final stage copies a
file the build produced and runs as a non-root user.

Only the instructions the Dockerfile uses are understood (FROM, WORKDIR,
COPY, RUN, USER, EXPOSE, ENTRYPOINT, CMD); anything else fails the check so
that a change to the Dockerfile cannot silently escape it.
"""

import pathlib
import shlex
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "container" / "Dockerfile"


def instructions(text):
    """(keyword, arguments) per instruction, continuation lines joined."""
    joined = text.replace("\\\n", " ")
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            yield keyword.upper(), rest.strip()


stages = []
for keyword, args in instructions(DOCKERFILE.read_text()):
    if keyword == "FROM":
        stages.append({"from": args, "steps": []})
    elif keyword in {"WORKDIR", "COPY", "RUN", "USER", "EXPOSE", "ENTRYPOINT", "CMD"}:
        stages[-1]["steps"].append((keyword, args))
    else:
        sys.exit(f"replay-container-build: unsupported instruction {keyword}")

build, final = stages[0], stages[-1]
with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    workdir = None
    for keyword, args in build["steps"]:
        if keyword == "WORKDIR":
            workdir = args
            (root / args.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, dest = shlex.split(args)
            dest_path = root / workdir.lstrip("/") / dest
            for source in sources:
                src = ROOT / source
                if not src.exists():
                    sys.exit(f"replay-container-build: COPY source {source} does not exist")
                if src.is_dir():
                    # A directory's contents go into the destination.
                    shutil.copytree(src, dest_path, dirs_exist_ok=True)
                elif dest.endswith("/") or len(sources) > 1:
                    dest_path.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dest_path / src.name)
                else:
                    dest_path.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dest_path)
            print(f"COPY {args}: ok")
        elif keyword == "RUN":
            cwd = root / workdir.lstrip("/")
            print(f"RUN {args} (in a copy holding only what COPY named)", flush=True)
            result = subprocess.run(["bash", "-c", args], cwd=cwd)
            if result.returncode != 0:
                sys.exit(f"replay-container-build: RUN failed with {result.returncode}")
    for keyword, args in final["steps"]:
        if keyword == "COPY" and args.startswith("--from="):
            source = shlex.split(args)[1]
            produced = root / source.lstrip("/")
            if not produced.is_file():
                sys.exit(f"replay-container-build: the final stage copies {source}, which the build did not produce")
            print(f"final stage copies {source}: produced ({produced.stat().st_size} bytes)")
    users = [args for keyword, args in final["steps"] if keyword == "USER"]
    if not users or users[-1].split(":")[0] in {"0", "root"}:
        sys.exit("replay-container-build: the image must run as a non-root USER")
    print(f"final stage runs as USER {users[-1]}: ok")
