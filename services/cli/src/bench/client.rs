//! The bench's load generator: one lean HTTP/1.1 keep-alive connection per request loop.
//!
//! The client shares the machine's two cores with the servers it measures, so every microsecond of CPU it spends per
//! request is taken from them, and most from the one that needs the CPU most: the trivial handler, which keeps its
//! core busy, while a verify also waits on Redis. A request here is one write of a prepared request and a read of
//! the answer parsed by `httparse`, on the loop's own connection: no pool, no per-request allocation, no connection
//! task, as wrk does. With reqwest, used before, the trivial handler served 61 000–63 000 req/s on the machine where it
//! serves 102 000–111 000 with this, while verify served about the same with both: the client's cost had lifted the
//! throughput ratio from 39 % to 63–69 % (BENCHMARKS.md, 2026-12-06).

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Headers an answer may have; the validator's carry the rate-limit and `X-Tollgate-*` fields.
const MAX_HEADERS: usize = 64;

/// Where the request loops send their requests.
#[derive(Debug, Clone)]
pub struct Target {
    addr: SocketAddr,
    path: &'static str,
}

impl Target {
    /// The endpoint the bench drives on a server it started on loopback.
    pub fn auth(port: u16) -> Target {
        Target { addr: SocketAddr::from(([127, 0, 0, 1], port)), path: "/v1/auth" }
    }

    /// The same endpoint as a URL, for requests made with another client.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, self.path)
    }
}

/// One keep-alive connection, opened on first use and again after an error.
pub struct Connection {
    target: Target,
    stream: Option<TcpStream>,
    request: Vec<u8>,
    received: Vec<u8>,
}

impl Connection {
    pub fn new(target: Target) -> Connection {
        Connection { target, stream: None, request: Vec::with_capacity(256), received: Vec::with_capacity(4096) }
    }

    /// Sends `GET` with this `Authorization` value and returns the answer's status once it is read whole.
    pub async fn get(&mut self, authorization: &str) -> io::Result<u16> {
        let answer = self.exchange(authorization).await;
        if answer.is_err() {
            // Whatever was half read belongs to a connection that is gone.
            self.stream = None;
            self.received.clear();
        }
        answer
    }

    async fn exchange(&mut self, authorization: &str) -> io::Result<u16> {
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                let stream = TcpStream::connect(self.target.addr).await?;
                stream.set_nodelay(true)?;
                self.stream.insert(stream)
            }
        };
        self.request.clear();
        for part in
            ["GET ", self.target.path, " HTTP/1.1\r\nhost: tollgate\r\nauthorization: ", authorization, "\r\n\r\n"]
        {
            self.request.extend_from_slice(part.as_bytes());
        }
        stream.write_all(&self.request).await?;
        loop {
            if let Some((status, length)) = parse_answer(&self.received)? {
                while self.received.len() < length {
                    read_more(stream, &mut self.received).await?;
                }
                self.received.drain(..length);
                return Ok(status);
            }
            read_more(stream, &mut self.received).await?;
        }
    }
}

async fn read_more(stream: &mut TcpStream, received: &mut Vec<u8>) -> io::Result<()> {
    received.reserve(4096);
    match stream.read_buf(received).await? {
        0 => Err(io::ErrorKind::UnexpectedEof.into()),
        _ => Ok(()),
    }
}

/// The status and whole length (head and body) of the answer at the start of `received`, once its head is there.
fn parse_answer(received: &[u8]) -> io::Result<Option<(u16, usize)>> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut answer = httparse::Response::new(&mut headers);
    let head = match answer.parse(received).map_err(|e| invalid(format!("unreadable answer: {e}")))? {
        httparse::Status::Complete(head) => head,
        httparse::Status::Partial => return Ok(None),
    };
    // The servers measured answer with a length: a chunked or unbounded body would be a change to look at.
    let length = answer
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok())
        .ok_or_else(|| invalid("an answer without a Content-Length".to_owned()))?;
    Ok(Some((answer.code.unwrap_or(0), head + length)))
}

#[cfg(test)]
mod tests {
    use super::parse_answer;

    #[test]
    fn an_answer_is_complete_once_its_head_is_read_and_spans_its_body() {
        let answer = b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 5\r\nretry-after: 1\r\n\r\nhello";
        let head = answer.len() - 5;
        assert_eq!(parse_answer(&answer[..head - 1]).expect("a partial head"), None);
        assert_eq!(parse_answer(answer).expect("a whole answer"), Some((429, answer.len())));
        assert_eq!(parse_answer(&answer[..head]).expect("a head without its body"), Some((429, answer.len())));
    }

    #[test]
    fn an_answer_without_a_length_or_with_garbage_is_an_error() {
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(parse_answer(b"SMTP ready\r\n\r\n").is_err());
    }
}
