//! A tiny raw keep-alive HTTP/1.1 client (no library between the bench and the socket).

use super::*;

use arl::api::{PoolSpec, PoolStatus, PoolView, SandboxList};
use serde::de::DeserializeOwned;

pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The body as an `arl::api` model (or any JSON type).
    pub fn json<T: DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not a {} ({e}): {}",
                std::any::type_name::<T>(),
                self.text()
            )
        })
    }
}

/// One kept-alive connection; requests go one at a time.
pub struct Client {
    reader: BufReader<Box<dyn Read + Send>>,
    writer: Box<dyn Write + Send>,
    out: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Client {
            writer: Box::new(stream.try_clone()?),
            reader: BufReader::with_capacity(64 * 1024, Box::new(stream)),
            out: Vec::with_capacity(1024),
        })
    }

    /// A connection to a Unix socket (a sandbox's agent, to bypass the daemon).
    pub fn connect_unix(path: &Path) -> std::io::Result<Client> {
        let stream = std::os::unix::net::UnixStream::connect(path)?;
        Ok(Client {
            writer: Box::new(stream.try_clone()?),
            reader: BufReader::with_capacity(64 * 1024, Box::new(stream)),
            out: Vec::with_capacity(1024),
        })
    }

    /// Writes the whole request in one `write` (one segment).
    pub fn send(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> std::io::Result<()> {
        self.out.clear();
        write!(self.out, "{method} {path} HTTP/1.1\r\nHost: bench\r\n")?;
        if let Some(body) = body {
            write!(
                self.out,
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )?;
            self.out.extend_from_slice(body);
        } else {
            self.out.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&self.out)
    }

    pub fn recv(&mut self) -> std::io::Result<Response> {
        read_response(&mut self.reader)
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> std::io::Result<Response> {
        self.send(method, path, body)?;
        self.recv()
    }

    pub fn get_json<T: DeserializeOwned>(&mut self, path: &str) -> T {
        let r = self.request("GET", path, None).expect("GET");
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        r.json()
    }

    /// `POST /v1/sandboxes` for one sandbox of `pool`; its id.
    pub fn acquire(&mut self, pool: &str) -> String {
        let body = format!(r#"{{"pool":"{pool}","count":1}}"#);
        let r = self
            .request("POST", "/v1/sandboxes", Some(body.as_bytes()))
            .expect("acquire");
        assert_eq!(r.status, 201, "acquire: {}", r.text());
        first_id(&r)
    }

    pub fn release(&mut self, id: &str) {
        let r = self
            .request("DELETE", &format!("/v1/sandboxes/{id}"), None)
            .expect("release");
        assert_eq!(r.status, 204, "release {id}: {}", r.text());
    }

    pub fn put_pool(&mut self, name: &str, spec: &PoolSpec) {
        // Unset options are left out (absent is their default on the wire), so the benches
        // also drive a daemon built before an option existed (benches/ab_benches.sh).
        let mut value = serde_json::to_value(spec).unwrap();
        if let Some(fields) = value.as_object_mut() {
            fields.retain(|_, v| !v.is_null());
        }
        let body = serde_json::to_vec(&value).unwrap();
        let r = self
            .request("PUT", &format!("/v1/pools/{name}"), Some(&body))
            .expect("put pool");
        assert_eq!(r.status, 200, "PUT pool {name}: {}", r.text());
    }

    /// `status` of one pool (idle, allocated, starting, total, ...).
    pub fn pool_status(&mut self, name: &str) -> PoolStatus {
        self.get_json::<PoolView>(&format!("/v1/pools/{name}"))
            .status
    }

    pub fn idle(&mut self, name: &str) -> u64 {
        self.pool_status(name).idle as u64
    }

    /// Polls until the pool has at least `n` idle sandboxes; the time it took.
    pub fn wait_idle(&mut self, name: &str, n: u64, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let st = self.pool_status(name);
            if st.idle as u64 >= n {
                return started.elapsed();
            }
            if started.elapsed() > timeout {
                panic!("pool {name} did not reach {n} idle within {timeout:?}: {st:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn metrics(&mut self) -> Metrics {
        let r = self.request("GET", "/metrics", None).expect("metrics");
        assert_eq!(r.status, 200);
        Metrics::parse(&r.text())
    }
}

/// The id of the first sandbox of an acquire's or a fork's answer.
pub fn first_id(r: &Response) -> String {
    let list: SandboxList = r.json();
    list.sandboxes
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no sandbox in {}", r.text()))
        .id
}

/// A pool spec: `min_idle` warm, at most `max`, the rest the defaults.
pub fn pool_spec(min_idle: usize, max: usize) -> PoolSpec {
    PoolSpec {
        min_idle,
        max,
        ..PoolSpec::default()
    }
}

fn read_response(reader: &mut impl BufRead) -> std::io::Result<Response> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "eof in headers",
            ));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
            {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if size == 0 {
                // Trailers until an empty line.
                loop {
                    line.clear();
                    reader.read_line(&mut line)?;
                    if line.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf)?;
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        reader.read_exact(&mut body)?;
    } else if status != 204 && status != 304 && !(100..200).contains(&status) {
        reader.read_to_end(&mut body)?;
    }
    Ok(Response { status, body })
}
