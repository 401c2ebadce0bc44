//! The VM's screen in the page: a WebSocket (binary frames, as noVNC speaks RFB) carried to the VNC server
//! QEMU runs on a private Unix socket.

use crate::api::{Console, Session};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Only the console's own page may open the screen: its Origin must be the console's address.
fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|h| h.to_str().ok());
    matches!((host, origin), (Some(h), Some(o)) if o == format!("http://{h}"))
}

pub async fn websocket(
    State(st): State<Console>,
    _s: Session,
    Path(name): Path<String>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !same_origin(&headers) {
        return (StatusCode::FORBIDDEN, "cross-origin screen request").into_response();
    }
    let Some(vm) = st.running_vm(&name) else {
        return (StatusCode::NOT_FOUND, format!("{name} is not running in this console")).into_response();
    };
    let vnc = match tokio::net::UnixStream::connect(&vm.vnc_socket).await {
        Ok(s) => s,
        Err(e) => {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("the VM's screen is not up yet: {e}"))
                .into_response()
        }
    };
    ws.protocols(["binary"]).on_upgrade(move |socket| pump(socket, vnc))
}

/// Copy bytes both ways until either side closes.
async fn pump(socket: WebSocket, vnc: tokio::net::UnixStream) {
    let (mut ws_tx, mut ws_rx) = socket.split();
    let (mut vnc_rx, mut vnc_tx) = vnc.into_split();
    let to_vnc = async {
        while let Some(Ok(msg)) = ws_rx.next().await {
            let data = match msg {
                Message::Binary(b) => b,
                Message::Close(_) => break,
                _ => continue,
            };
            if vnc_tx.write_all(&data).await.is_err() {
                break;
            }
        }
    };
    let to_ws = async {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match vnc_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_tx.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = ws_tx.close().await;
    };
    tokio::select! {
        _ = to_vnc => {}
        _ = to_ws => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_console_itself_is_same_origin() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:4000".parse().unwrap());
        assert!(!same_origin(&h), "no Origin: refused");
        h.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert!(!same_origin(&h));
        h.insert(header::ORIGIN, "http://127.0.0.1:4000".parse().unwrap());
        assert!(same_origin(&h));
    }
}
