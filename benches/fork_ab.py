"""Same-run A/B of a fork straight from a live sandbox with a 100 MB writable layer.

    sudo python3 benches/fork_ab.py AFTER_BIN BEFORE_BIN [ROUNDS]

Three daemons at once: AFTER_BIN with `--snapshot-store memory`, AFTER_BIN with
`--snapshot-store disk`, and BEFORE_BIN with its defaults (a build without the flag). Each
leases a sandbox, writes 100 MB of random data into /workspace, then per round (the order
rotated each round, so one daemon's background clean-up does not always fall on the same
next one) takes and deletes a snapshot and makes two live forks (each checked for the file,
then released). Prints p50/p99/min of each and, from the daemons' debug logs, the split of a
snapshot (freeze, copy, thaw) and of a live fork (snapshot, fork).
"""
import http.client, json, os, subprocess, sys, time, tempfile, statistics, socket
def port():
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]; s.close(); return p
class D:
    def __init__(s, name, bin, args):
        s.name=name; s.dir=tempfile.mkdtemp(prefix="arl-fkman-"); s.port=port()
        open(f"{s.dir}/node.toml","w").write('[pools.default]\nmin_idle = 1\nmax = 40\ndisk_mb = 512\nmemory_mb = 256\n')
        env=dict(os.environ, ARL_LOG="warn,arl::node=debug")
        s.log=open(f"{s.dir}/node.log","w")
        s.p=subprocess.Popen([bin,"node","--listen",f"127.0.0.1:{s.port}","--state-dir",f"{s.dir}/state","--cgroup-parent",f"arl-fkman-{len(name)}-{os.getpid()}","--config",f"{s.dir}/node.toml"]+args,stdout=s.log,stderr=s.log,env=env)
        for _ in range(400):
            try:
                if s.req("GET","/healthz")[0]==200: break
            except Exception: time.sleep(0.05)
        while s.req("GET","/v1/pools/default")[1]["status"]["idle"]<1: time.sleep(0.05)
        st,b=s.req("POST","/v1/sandboxes",{"pool":"default"}); s.parent=b["sandboxes"][0]["id"]
        st,b=s.req("POST",f"/v1/sandboxes/{s.parent}/exec",{"shell":"head -c 100000000 /dev/urandom > /workspace/big && sync"})
        assert b["exit_code"]==0,b
        s.live=[]; s.snap=[]
    def req(s,m,path,body=None):
        c=http.client.HTTPConnection("127.0.0.1",s.port,timeout=60)
        c.request(m,path,body=json.dumps(body) if body is not None else None,headers={"content-type":"application/json"})
        r=c.getresponse(); d=r.read(); c.close()
        return r.status,(json.loads(d) if d else None)
    def fork(s):
        t=time.perf_counter(); st,b=s.req("POST",f"/v1/sandboxes/{s.parent}/fork"); s.live.append((time.perf_counter()-t)*1000)
        assert st==201,b
        fid=b["sandboxes"][0]["id"]
        st,r=s.req("POST",f"/v1/sandboxes/{fid}/exec",{"shell":"stat -c %s /workspace/big"}); assert r["stdout"]=="100000000\n",r
        s.req("DELETE",f"/v1/sandboxes/{fid}")
    def snapshot(s):
        t=time.perf_counter(); st,b=s.req("POST",f"/v1/sandboxes/{s.parent}/snapshots"); s.snap.append((time.perf_counter()-t)*1000)
        assert st==201,b; s.req("DELETE",f"/v1/snapshots/{b['id']}")
    def stop(s):
        s.req("DELETE",f"/v1/sandboxes/{s.parent}")
        s.p.terminate(); s.p.wait(60)
        subprocess.run(f"grep -o ' /[^ ]*arl-fkman[^ ]*' /proc/self/mountinfo | xargs -r -n1 umount -l",shell=True)
def pct(v,p):
    v=sorted(v); import math; return v[max(0,math.ceil(p/100*len(v))-1)]
after,before=sys.argv[1],sys.argv[2]
ds=[D("after, --snapshot-store memory",after,["--snapshot-store","memory"]),D("after, --snapshot-store disk",after,["--snapshot-store","disk"]),D("before",before,[])]
N=int(sys.argv[3]) if len(sys.argv)>3 else 10
for r in range(N):
    order=ds[r%3:]+ds[:r%3]
    for d in order: d.snapshot()
    for d in order: d.fork()
    for d in order: d.fork()
for d in ds:
    import re; log=re.sub(r"\x1b\[[0-9;]*m","",open(f"{d.dir}/node.log").read())
    def vals(msg,f):
        out=[]
        for l in log.splitlines():
            if msg in l and f+"=" in l:
                try: out.append(float(l.split(f+"=")[1].split()[0]))
                except: pass
        return out
    split=", ".join(f"{f} p50 {statistics.median(vals(m,f)):.1f}" for m,f in [("snapshot copied","freeze_ms"),("snapshot copied","copy_ms"),("snapshot copied","thaw_ms"),("forked a live","snapshot_ms"),("forked a live","fork_ms")] if vals(m,f))
    print(f"{d.name:32} live fork n={len(d.live)} p50 {pct(d.live,50):.1f} p99 {pct(d.live,99):.1f} min {min(d.live):.1f} | snapshot n={len(d.snap)} p50 {pct(d.snap,50):.1f} p99 {pct(d.snap,99):.1f} | {split}")
for d in ds: d.stop()
