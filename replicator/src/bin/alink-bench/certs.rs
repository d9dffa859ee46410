//! Certificates for the TLS measurements: one CA and one host certificate (name `peer`)
//! that both peers present, written to a directory the bench removes when done.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use replicator::LinkTls;

/// The name in the host certificate, which the dialing peer checks.
pub const PEER_NAME: &str = "peer";

/// A directory of bench certificates, removed on drop.
#[derive(Debug)]
pub struct Certs {
    dir: PathBuf,
}

impl Certs {
    /// Makes the CA and host certificate in a new directory under the temporary directory.
    pub fn make() -> anyhow::Result<Certs> {
        let dir = std::env::temp_dir().join(format!("alink-bench-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
        let mut host = CertificateParams::new(vec![PEER_NAME.to_string()])?;
        host.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = host.signed_by(&key, &ca)?;
        let certs = Certs { dir };
        for (file, text) in [
            ("ca.pem", ca.as_ref().pem()),
            ("host.pem", cert.pem()),
            ("host.key", key.serialize_pem()),
        ] {
            let path = certs.dir.join(file);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(certs)
    }

    /// The directory, for `alink-bench peer --tls-dir`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The TLS of a peer from a directory [`Certs::make`] wrote.
pub fn link_tls(dir: &Path, listen: bool) -> anyhow::Result<LinkTls> {
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    };
    let (cert, key, ca) = (read("host.pem")?, read("host.key")?, read("ca.pem")?);
    Ok(if listen {
        LinkTls::listen(&cert, &key, &ca)?
    } else {
        LinkTls::connect(&cert, &key, &ca, PEER_NAME)?
    })
}
