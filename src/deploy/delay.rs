//! A TCP delay line: forwards every connection on `listen` to `upstream`, holding each chunk of
//! bytes for `delay` in both directions. The rehearsal uses it for a provider's link latency where
//! the kernel has no `netem` qdisc (rate is shaped by `tbf` either way). Plain threads: a
//! rehearsal has a handful of connections, and this keeps tokio's I/O features out of the build.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Serves until the process ends.
pub fn serve(listen: SocketAddr, upstream: SocketAddr, delay: Duration) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    for client in listener.incoming() {
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("delay proxy: accept failed: {e}");
                continue;
            }
        };
        std::thread::spawn(move || {
            let server = match TcpStream::connect(upstream) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("delay proxy: {upstream}: {e}");
                    return;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (c2, s2) = match (client.try_clone(), server.try_clone()) {
                (Ok(c), Ok(s)) => (c, s),
                _ => return,
            };
            let up = std::thread::spawn(move || pipe(client, server, delay));
            pipe(s2, c2, delay);
            let _ = up.join();
        });
    }
    Ok(())
}

/// Copies `from` to `to`, each chunk written `delay` after it was read.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        for (due, chunk) in rx {
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_arrive_intact_and_late() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = echo.accept().unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
        });
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        std::thread::spawn(move || serve(port, upstream, Duration::from_millis(100)));
        let t0 = Instant::now();
        let mut c = loop {
            match TcpStream::connect(port) {
                Ok(c) => break c,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let connected = t0.elapsed();
        let t1 = Instant::now();
        c.write_all(b"hello").unwrap();
        let mut back = [0u8; 5];
        c.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"hello");
        // Held once each way: a lower bound only (no upper bound: the machine may be slow).
        assert!(t1.elapsed() >= Duration::from_millis(200), "round trip {:?} (connect {connected:?})", t1.elapsed());
    }
}
