"""A script written for the original ARL-Infra SDK runs unchanged against ARL nodes.

    ARL_ENDPOINTS=http://127.0.0.1:8420 python examples/seed_session.py
"""

from arl import Command, FilePatch, SandboxSession, WarmPoolManager

manager = WarmPoolManager()
manager.create_warmpool(name="python-pool", image="python:3.12", profile="python-pool", replicas=2)
manager.wait_for_ready("python-pool", timeout=60, poll_interval=0.2)

with SandboxSession(image="python:3.12", profile="python-pool") as session:
    result = session.execute([{"name": "hello", "command": ["echo", "Hello, World!"]}])
    print(result.results[0].output.stdout, end="")

    result = session.execute(
        [
            FilePatch(name="write", path="app.py", content="print('patched')\n"),
            Command(name="run", command=["python3", "app.py"]),
        ],
        on_output=lambda out, err: print(out or err, end=""),
    )
    print("exit codes:", [r.output.exit_code for r in result.results])

manager.delete_warmpool("python-pool")
