//! The replication client's authentication against a real server: SCRAM-SHA-256, md5, trust,
//! and a wrong password refused as a definite (not retryable) error.

use std::str::FromStr;

use rowcast::capture::replication::{ConnectParams, ReplicationClient, ReplicationError};

use crate::support::{Cluster, connect};

const HBA: &str = "\
local all         all                     trust
host  all         scram_user 127.0.0.1/32 scram-sha-256
host  all         md5_user   127.0.0.1/32 md5
host  all         all        127.0.0.1/32 trust
";

async fn identify(url: &str) -> Result<Vec<Option<String>>, ReplicationError> {
    let target = rowcast::pg::Target::from_str(url).expect("url");
    let params = ConnectParams::from_target(&target, 1 << 20);
    let mut client = ReplicationClient::connect(&params).await?;
    let mut rows = client.simple_query("IDENTIFY_SYSTEM").await?;
    Ok(rows.pop().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_md5_and_trust_authenticate() {
    let cluster = Cluster::start_with_hba(&[], Some(HBA)).expect("start cluster");
    let admin = connect(&cluster.url("postgres")).await;
    admin
        .batch_execute(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 's3cret';
             SET password_encryption = 'md5';
             CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5-pass';",
        )
        .await
        .expect("roles");
    let port = cluster.port();
    for url in [
        format!("postgres://scram_user:s3cret@127.0.0.1:{port}/postgres"),
        format!("postgres://md5_user:md5-pass@127.0.0.1:{port}/postgres"),
        format!("postgres://postgres@127.0.0.1:{port}/postgres"),
    ] {
        let row = identify(&url).await.unwrap_or_else(|err| panic!("{url}: {err}"));
        // IDENTIFY_SYSTEM: systemid, timeline, xlogpos, dbname.
        assert_eq!(row.len(), 4, "{url}: {row:?}");
        assert_eq!(
            row[3].as_deref(),
            Some("postgres"),
            "{url}: connected with replication=database"
        );
    }

    for url in [
        format!("postgres://scram_user:wrong@127.0.0.1:{port}/postgres"),
        format!("postgres://md5_user:wrong@127.0.0.1:{port}/postgres"),
    ] {
        let err = identify(&url).await.expect_err("wrong password accepted");
        assert!(!err.is_retryable(), "{url}: {err} should be definite");
        assert!(err.to_string().contains("28P01"), "{url}: {err}");
    }
    let err = identify(&format!("postgres://scram_user@127.0.0.1:{port}/postgres"))
        .await
        .expect_err("no password");
    assert!(matches!(err, ReplicationError::Auth(_)), "{err}");
    assert!(!err.is_retryable());
}
