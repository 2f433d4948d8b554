//! Certificates for TLS tests, made with the `openssl` command: a CA, a server certificate
//! for `localhost` only (no IP address) signed by it, and an unrelated second CA.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    /// Makes the files in a fresh directory. When the tests run as root, the Postgres server
    /// runs as `postgres` (see `Cluster`): the directory and the key are handed to it, the
    /// key with mode 0600 as the server demands.
    pub fn new() -> Certs {
        let dir = tempfile::Builder::new().prefix("rowcast-certs-").tempdir().expect("temp dir");
        let certs = Certs { dir };
        certs.make_ca("ca");
        certs.make_ca("other-ca");
        certs.openssl(
            "req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
             -keyout server.key -out server.csr -subj /CN=localhost",
        );
        std::fs::write(
            certs.path("server.ext"),
            "subjectAltName=DNS:localhost\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write server.ext");
        certs.openssl(
            "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
             -extfile server.ext -out server.pem",
        );
        let key = certs.path("server.key");
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod server.key");
        let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout == b"0\n");
        if root {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(certs.dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown the certificates to postgres");
        }
        certs
    }

    fn make_ca(&self, name: &str) {
        self.openssl(&format!(
            "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
             -keyout {name}.key -out {name}.pem -days 2 -subj /CN=rowcast-test-{name} \
             -addext basicConstraints=critical,CA:TRUE \
             -addext keyUsage=critical,keyCertSign,cRLSign"
        ));
    }

    /// Runs `openssl` in the directory; `args` are separated by whitespace.
    fn openssl(&self, args: &str) {
        let args: Vec<&str> = args.split_whitespace().collect();
        let output = Command::new("openssl")
            .args(&args)
            .current_dir(self.dir.path())
            .output()
            .expect("run openssl (is it installed?)");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA that signed the server certificate.
    pub fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// A CA that signed nothing here.
    pub fn other_ca(&self) -> PathBuf {
        self.path("other-ca.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.path("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.path("server.key")
    }

    /// Server settings for `Cluster::start_with_hba`: TLS on, with these files.
    pub fn server_settings(&self) -> Vec<(String, String)> {
        let path = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
        vec![
            ("ssl".into(), "on".into()),
            ("ssl_cert_file".into(), path(&self.server_cert())),
            ("ssl_key_file".into(), path(&self.server_key())),
        ]
    }
}
