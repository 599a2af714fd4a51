//! Proves that the control socket answers malformed JSON, unknown ops, missing or wrong fields, oversized lines and non-root peers with error responses, without crashing or hanging, and keeps serving afterwards.

mod common;

use common::{read_answer, request, require_root_and_fuse, Harness, LCFS};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn errno(answer: &Value) -> i64 {
    assert_eq!(answer["ok"], false, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{answer}"
    );
    answer["error"]["errno"].as_i64().expect("errno")
}

#[test]
fn bad_requests_get_error_answers() {
    require_root_and_fuse();
    let mut h = Harness::new();
    h.mkfs();
    h.start();

    let mut s = h.connect();
    let einval = libc::EINVAL as i64;
    assert_eq!(errno(&request(&mut s, "this is not json")), einval);
    assert_eq!(errno(&request(&mut s, "{\"op\": \"layer.create\"")), einval);
    assert_eq!(errno(&request(&mut s, "[\"ping\"]")), einval);
    assert_eq!(errno(&request(&mut s, r#"{"name":"x"}"#)), einval);
    assert_eq!(
        errno(&request(&mut s, r#"{"op":"layer.self_destruct"}"#)),
        libc::ENOSYS as i64
    );
    assert_eq!(errno(&request(&mut s, r#"{"op":"layer.create"}"#)), einval);
    assert_eq!(
        errno(&request(&mut s, r#"{"op":"layer.commit","name":3}"#)),
        einval
    );
    assert_eq!(
        errno(&request(&mut s, r#"{"op":"layer.remove","name":"ghost"}"#)),
        libc::ENOENT as i64
    );
    // The same connection still serves good requests after all that.
    let ok = request(&mut s, r#"{"op":"layer.create","name":"fine"}"#);
    assert_eq!(ok["ok"], true, "{ok}");
    assert_eq!(ok["result"]["name"], "fine");
    let list = request(&mut s, r#"{"op":"layer.list"}"#);
    assert_eq!(list["result"].as_array().unwrap().len(), 1);

    // Pipelined requests are answered in order.
    let mut s = h.connect();
    s.write_all(b"{\"op\":\"ping\"}\n\n{\"op\":\"nope\"}\r\n{\"op\":\"sync\"}\n")
        .unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut answers = Vec::new();
    for _ in 0..3 {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        answers.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    assert_eq!(answers[0]["ok"], true);
    assert_eq!(errno(&answers[1]), libc::ENOSYS as i64);
    assert_eq!(answers[2], serde_json::json!({"ok": true, "result": null}));

    // A line over 1 MiB: an EMSGSIZE answer, then the daemon closes the connection.
    let mut s = h.connect();
    let writer = {
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = w.write_all(&vec![b'x'; 3 << 20]);
        })
    };
    assert_eq!(errno(&read_answer(&s)), libc::EMSGSIZE as i64);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    writer.join().unwrap();

    // A peer that is not root is refused (SO_PEERCRED), even when file
    // permissions would let it connect.
    for dir in [h.dir.path(), h.socket.parent().unwrap()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&h.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", LCFS])
        .arg("--control-socket")
        .arg(&h.socket)
        .args(["layer", "ls"])
        .output()
        .expect("run setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("root-only"), "{stderr}");

    // Still alive and serving.
    let ping = request(&mut h.connect(), r#"{"op":"ping"}"#);
    assert_eq!(ping["result"]["pid"], h.daemon.as_ref().unwrap().id());
    let status = h.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}\n{}", h.log_text());
}
