//! The floor: a minimal keep-alive HTTP server that spawns /bin/true per request.

use super::*;

pub struct Floor {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Floor {
    /// Thread per connection; each request runs `/bin/true` (`posix_spawn`, `waitpid`) and
    /// answers a small JSON body with its exit code and duration.
    pub fn start() -> Floor {
        let listener = TcpListener::bind("127.0.0.1:0").expect("floor bind");
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                std::thread::spawn(move || {
                    let _ = floor_connection(stream);
                });
            }
        });
        Floor { addr, stop }
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr).expect("connect to floor")
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Runs `/bin/true` and waits for it, the cheapest way a server can: `posix_spawn` + `waitpid`
/// (std's `Command` forks in a static binary, copying the page tables, which would flatter ARL).
pub fn spawn_true() -> std::io::Result<i32> {
    let path = c"/bin/true";
    let argv = [path.as_ptr().cast_mut(), std::ptr::null_mut()];
    let envp = [std::ptr::null_mut()];
    let mut pid = 0;
    // SAFETY: a NUL-terminated path, NULL-terminated argv and envp that outlive the call.
    let rc = unsafe {
        libc::posix_spawn(
            &mut pid,
            path.as_ptr(),
            std::ptr::null(),
            std::ptr::null(),
            argv.as_ptr(),
            envp.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    let mut status = 0;
    // SAFETY: waiting for the child just spawned.
    if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(libc::WEXITSTATUS(status))
}

fn floor_connection(stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut body = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut length = 0usize;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
        let started = Instant::now();
        let code = spawn_true()?;
        let reply = format!(
            r#"{{"stdout":"","stderr":"","exit_code":{code},"signal":null,"timed_out":false,"truncated":false,"duration_ms":{:.3}}}"#,
            ms(started.elapsed())
        );
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            reply.len()
        );
        let mut out = head.into_bytes();
        out.extend_from_slice(reply.as_bytes());
        writer.write_all(&out)?;
    }
}

pub const EXEC_TRUE: &[u8] = br#"{"cmd":["/bin/true"]}"#;

/// Times `n` calls of `POST path` with `body` on one client; milliseconds each. Panics on a
/// non-200 answer or a nonzero exit code.
pub fn time_execs(
    client: &mut Client,
    path: &str,
    n: usize,
    agent_ms: Option<&mut Vec<f64>>,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    let mut agent = agent_ms;
    for _ in 0..n {
        let t = Instant::now();
        let r = client.request("POST", path, Some(EXEC_TRUE)).expect("exec");
        out.push(ms(t.elapsed()));
        assert_eq!(r.status, 200, "exec: {}", r.text());
        let v: arl::api::ExecResult = r.json();
        assert_eq!(v.exit_code, 0, "exec: {v:?}");
        if let Some(a) = agent.as_deref_mut() {
            a.push(v.duration_ms);
        }
    }
    out
}
