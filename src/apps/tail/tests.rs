//! `rowcast tail` without a server: flags, backoff, close reasons.

use super::*;

fn args(extra: &[&str]) -> Result<Tail, TailError> {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        tail: TailArgs,
    }
    let argv = ["tail"].iter().chain(extra);
    let cli = <Cli as clap::Parser>::try_parse_from(argv)
        .map_err(|err| invalid("cli", err.to_string()))?;
    Tail::new(cli.tail)
}

#[test]
fn flags() {
    let tail = args(&["--type", "agent.*,user.created", "--type", "*.failed"]).expect("tail");
    assert_eq!(tail.filter.types, ["agent.*", "user.created", "*.failed"]);
    assert_eq!(tail.endpoint.as_str(), "ws://127.0.0.1:8080/ws/events");
    let tail =
        args(&["--severity", "error", "--since", "7", "--organization-id", "q"]).expect("tail");
    assert_eq!(tail.filter.severity, Some(Severity::Error));
    assert_eq!(tail.since, Some(7));
    assert!(args(&["--severity", "loud"]).is_err());
    assert!(args(&["--type", "agent.*,"]).is_err(), "an empty pattern");
    assert!(args(&["--organization-id", ""]).is_err());
    assert!(args(&["--max-backoff", "0s"]).is_err());
    assert!(args(&["--max-frame-bytes", "10"]).is_err());

    let tail =
        args(&["--where", "status:in:failed,error", "--where", "status:changed"]).expect("tail");
    assert_eq!(tail.filter.predicates, ["status:in:failed,error", "status:changed"]);
    let err = args(&["--where", "status:like:x"]).expect_err("an unknown operator").to_string();
    assert!(err.starts_with("invalid --where"), "{err}");
    assert!(args(&["--where", "status"]).is_err(), "no operator");
    assert_eq!(args(&["--history", "20"]).expect("tail").history, Some(20));
    for refused in [["--history", "0"], ["--history", "1001"], ["--history", "x"]] {
        assert!(args(&refused).is_err(), "{refused:?}");
    }
    assert!(args(&["--history", "5", "--since", "3"]).is_err(), "one or the other");
}

#[test]
fn token_is_never_shown() {
    let tail = args(&["--token", "s3cret-token"]).expect("tail");
    assert!(!format!("{tail:?}").contains("s3cret"));
    let err = args(&["--token", "bad\ntoken"]).expect_err("a newline in a token");
    assert!(!err.to_string().contains("token\n") && !err.to_string().contains("bad"), "{err}");
    assert!(args(&["--token", ""]).is_err());
}

#[test]
fn backoff_grows_with_jitter_up_to_the_cap_and_resets() {
    let mut backoff = Backoff::new(INITIAL_BACKOFF, Duration::from_secs(2));
    let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
    assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= INITIAL_BACKOFF);
    assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
    assert!(delays[7] >= Duration::from_secs(1));
    backoff.reset();
    assert!(backoff.next_delay() <= INITIAL_BACKOFF);
}

#[test]
fn refusals_are_definite_and_server_errors_retryable() {
    let http = |status: u16, body: &str| {
        let mut response = tungstenite::http::Response::new(Some(body.as_bytes().to_vec()));
        *response.status_mut() = StatusCode::from_u16(status).expect("status");
        Failure::from_handshake(tungstenite::Error::Http(Box::new(response)))
    };
    let Failure::Definite(err) = http(401, "invalid token\x1b[31m") else { panic!("401 retried") };
    let err = err.to_string();
    assert!(
        err.contains("401 Unauthorized: invalid token[31m") && err.contains("--token"),
        "{err}"
    );
    for status in [400, 403, 404, 200, 301] {
        assert!(matches!(http(status, ""), Failure::Definite(_)), "{status}");
    }
    for status in [500, 502, 503, 408, 429] {
        assert!(matches!(http(status, ""), Failure::Retryable(_)), "{status}");
    }
    let io = tungstenite::Error::Io(io::Error::from(io::ErrorKind::ConnectionRefused));
    assert!(matches!(Failure::from_handshake(io), Failure::Retryable(_)));
}

#[test]
fn close_reasons_are_named() {
    let close = |code: u16, reason: &str| {
        describe_close(Some(&CloseFrame { code: code.into(), reason: reason.into() }))
    };
    assert!(close(4008, "slow consumer; last delivered id 3").contains("slow consumer"));
    assert!(close(1001, "").contains("shutting down"));
    assert!(describe_close(None).contains("without a code"));
}
