//! `isr console PARCEL`: the running VM's serial console on this terminal, interactive. Ctrl-] detaches.

use isr_client::ClientError;
use std::io::IsTerminal;
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Ctrl-]: the key that ends the session (as telnet's escape).
const DETACH: u8 = 0x1d;

/// The terminal's settings, restored when dropped.
struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    /// Put stdin's terminal into raw mode (keys go to the guest as typed, Ctrl-C included).
    fn enter() -> Option<RawMode> {
        if !std::io::stdin().is_terminal() {
            return None;
        }
        // SAFETY: termios is plain old data; tcgetattr fills it for fd 0, which is a terminal (checked above).
        #[allow(unsafe_code)]
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return None;
            }
            Some(RawMode { saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores settings tcgetattr returned for the same descriptor.
        #[allow(unsafe_code)]
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.saved);
        }
    }
}

/// Bridge this terminal and the console socket until the VM ends, the user detaches, or stdin closes.
pub async fn attach(parcel: &str, socket: &Path) -> Result<(), ClientError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| ClientError::io(format!("connecting to the console of {parcel}"), e))?;
    let raw = RawMode::enter();
    eprint!("isr: console of {parcel} (Ctrl-] detaches)\r\n");
    let (mut from_vm, mut to_vm) = stream.into_split();
    let mut stdin = tokio::io::stdin();
    let mut stdout = tokio::io::stdout();
    let keys = async {
        let mut buf = [0u8; 1024];
        loop {
            let n = match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let data = &buf[..n];
            if let Some(pos) = data.iter().position(|&b| b == DETACH && raw.is_some()) {
                let _ = to_vm.write_all(&data[..pos]).await;
                return;
            }
            if to_vm.write_all(data).await.is_err() {
                return;
            }
        }
    };
    let screen = async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match from_vm.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if stdout.write_all(&buf[..n]).await.is_err() || stdout.flush().await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = keys => {}
        _ = screen => {}
    }
    drop(raw);
    eprintln!("\r\nisr: detached from {parcel}");
    Ok(())
}
