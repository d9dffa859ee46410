//! The lab's certificates, made once per lab (`<lab>/pki/`): a root CA, and under it a CA
//! that signs only the controllers' client certificates and one that signs only the agents'
//! certificates. Each agent serves its API with a certificate for its management address
//! and node name, signed by the agents' CA, and admits only clients whose certificate chains
//! to the controllers' CA: an agent's or any other certificate of the pair is refused. Each
//! controller calls the agents with its own client certificate and trusts only the agents'
//! CA for theirs. The agents' A-Links admit only the agents' CA (the dialer also checks the
//! listener's name). Each controller serves the public API with a certificate for its address
//! and the system IP, signed by the root; pvctl trusts the root. Keys are ECDSA P-256, written
//! 0600.
//!
//! And the lab's first admin token: its text in `admin.token` (0600, what `lab up` prints and
//! pvctl uses by default), its hash in `tokens.json`, the controllers' token file.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::Context;

use crate::files::write_file;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::plan::{HOSTS, Host, Plan};

/// The PEM files of one certificate and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pair {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// Where the lab's certificates are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// The lab's certificates (made by [`Pki::ensure`]).
    pub fn of(plan: &Plan) -> Pki {
        Pki {
            dir: plan.dir().join("pki"),
        }
    }

    /// The root CA's certificate: what clients of an agent trust.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The controllers' CA certificate: the only clients an agent admits.
    pub fn controllers_ca(&self) -> PathBuf {
        self.dir.join("controllers-ca.pem")
    }

    /// The agents' CA certificate: the only CA an agent's certificate chains to.
    pub fn agents_ca(&self) -> PathBuf {
        self.dir.join("agents-ca.pem")
    }

    /// Node `host`'s agent's certificate (server and client use: its API and A-Links).
    pub fn agent(&self, host: &Host) -> Pair {
        self.pair(&format!("{}-agent", host.name))
    }

    /// Node `host`'s controller's public API certificate (its address and the system IP).
    pub fn api(&self, host: &Host) -> Pair {
        self.pair(&format!("{}-api", host.name))
    }

    /// Node `host`'s controller's client certificate.
    pub fn controller(&self, host: &Host) -> Pair {
        self.pair(&format!("{}-controller", host.name))
    }

    /// The first admin token's text (0600).
    pub fn admin_token(&self) -> PathBuf {
        self.dir.join("admin.token")
    }

    /// The controllers' token file: the first admin token's record.
    pub fn tokens_file(&self) -> PathBuf {
        self.dir.join("tokens.json")
    }

    fn pair(&self, name: &str) -> Pair {
        Pair {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
        }
    }

    /// Makes the certificates unless the lab has them all (they last as long as the lab).
    pub fn ensure(&self, plan: &Plan) -> anyhow::Result<()> {
        self.ensure_certificates(plan)?;
        self.ensure_admin_token()
    }

    /// Makes the first admin token unless the lab has it.
    fn ensure_admin_token(&self) -> anyhow::Result<()> {
        if self.admin_token().exists() && self.tokens_file().exists() {
            return Ok(());
        }
        let token = proto::auth::Token::generate()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let record =
            proto::auth::TokenRecord::of(&token, "admin", proto::auth::Role::Admin, "install", now);
        write_file(
            &self.tokens_file(),
            &serde_json::to_string_pretty(&[record])?,
            0o644,
        )?;
        write_file(&self.admin_token(), format!("{token}\n"), 0o600)
    }

    fn ensure_certificates(&self, plan: &Plan) -> anyhow::Result<()> {
        if self.files().iter().all(|f| f.exists()) {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let root =
            CertifiedIssuer::self_signed(ca_params("Pairvisor lab CA")?, KeyPair::generate()?)?;
        let controllers_key = KeyPair::generate()?;
        let controllers_params = ca_params("Pairvisor lab controllers CA")?;
        let controllers_cert = controllers_params.signed_by(&controllers_key, &root)?;
        let controllers = Issuer::new(controllers_params, controllers_key);
        let agents_key = KeyPair::generate()?;
        let agents_params = ca_params("Pairvisor lab agents CA")?;
        let agents_cert = agents_params.signed_by(&agents_key, &root)?;
        let agents = Issuer::new(agents_params, agents_key);
        for host in HOSTS.iter().filter(|h| !h.is_witness()) {
            let ip = plan.mgmt_ip(host);
            let agent = leaf(&format!("{} agent", host.name), host.name, &[ip], true)?;
            self.write_leaf(&self.agent(host), &agent, &agents)?;
            let api = leaf(
                &format!("{} API", host.name),
                host.name,
                &[ip, plan.system_ip()],
                true,
            )?;
            self.write_leaf(&self.api(host), &api, &root)?;
            let controller = leaf(&format!("{} controller", host.name), host.name, &[], false)?;
            self.write_leaf(&self.controller(host), &controller, &controllers)?;
        }
        write_file(&self.controllers_ca(), controllers_cert.pem(), 0o644)?;
        write_file(&self.agents_ca(), agents_cert.pem(), 0o644)?;
        write_file(&self.ca(), root.as_ref().pem(), 0o644)
    }

    /// Every file of a whole set.
    fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.ca(), self.controllers_ca(), self.agents_ca()];
        for host in HOSTS.iter().filter(|h| !h.is_witness()) {
            for pair in [self.agent(host), self.api(host), self.controller(host)] {
                files.extend([pair.cert, pair.key]);
            }
        }
        files
    }

    fn write_leaf(
        &self,
        pair: &Pair,
        params: &CertificateParams,
        issuer: &Issuer<'_, KeyPair>,
    ) -> anyhow::Result<()> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, issuer)?;
        write_file(&pair.key, key.serialize_pem(), 0o600)?;
        write_file(&pair.cert, cert.pem(), 0o644)
    }
}

fn ca_params(name: &str) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// A leaf certificate's parameters: a server's (for `ips` and `dns`) or a client's.
fn leaf(
    name: &str,
    dns: &str,
    ips: &[Ipv4Addr],
    server: bool,
) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(vec![dns.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    for ip in ips {
        params
            .subject_alt_names
            .push(SanType::IpAddress((*ip).into()));
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // A server's certificate is good for client use too (a host calls its peer): only the
    // controllers' CA, not the use, keeps it off the agent API.
    params.extended_key_usages = if server {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    Ok(params)
}
