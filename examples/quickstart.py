"""Synchronous quick start: acquire a sandbox, run commands, move files, release.

    ARL_ENDPOINTS=http://127.0.0.1:8420 python examples/quickstart.py
"""

import arl

client = arl.Client()  # ARL_ENDPOINTS / ARL_TOKEN, default http://127.0.0.1:8420

print("pools:", [(p.name, p.status.idle) for p in client.pools()])

with client.sandbox("default", env={"GREETING": "hello"}) as sb:
    print(sb.exec(["sh", "-c", "echo $GREETING from $(pwd)"]).stdout, end="")

    r = sb.exec("exit 3")  # a non-zero exit code is data, not an exception
    print("exit code:", r.exit_code)

    sb.write_files({"main.py": "import sys\nprint(sys.version.split()[0])\n"})
    print("python in the sandbox:", sb.exec(["python3", "main.py"]).stdout, end="")

    for item in sb.stream("for i in 1 2 3; do echo tick $i; sleep 0.1; done"):
        if isinstance(item, arl.OutputChunk):
            print("  stream:", item.data, end="")
        else:
            print("  result: exit", item.exit_code, f"in {item.duration * 1000:.1f} ms")

    r = sb.exec(["sleep", "5"], timeout=0.2)
    print("timed out:", r.timed_out)

    sb.reset()  # wipe /workspace and /tmp, kill leftovers
# released here
client.close()
