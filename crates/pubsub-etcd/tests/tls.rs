//! TLS with client certificates: an etcd that requires them is reachable
//! with the CA and a client certificate, and refuses a client without one.

mod common;

use std::path::Path;
use std::time::Duration;

use common::etcd_proc::{ClusterOptions, EtcdCluster, TlsFiles};
use pubsub_etcd::{Client, NewTopic, Record};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};

/// Writes a CA and a certificate for 127.0.0.1 (server and client use).
fn make_certificates(dir: &Path) -> TlsFiles {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "pubsub-etcd test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    params
        .distinguished_name
        .push(DnType::CommonName, "pubsub-etcd test");
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &ca).unwrap();

    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.ca, ca.pem()).unwrap();
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_works_and_a_client_without_certificate_is_refused() {
    let dir = std::env::temp_dir().join(format!("pubsub-etcd-tls-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let tls = make_certificates(&dir);
    let cluster = EtcdCluster::start_with(ClusterOptions {
        members: 1,
        tls: Some(tls.clone()),
        ..ClusterOptions::default()
    });

    let client = Client::builder(cluster.endpoints())
        .ca_cert(&tls.ca)
        .client_cert(&tls.cert, &tls.key)
        .namespace("tls")
        .connect()
        .await
        .unwrap();
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    let offset = producer.send(Record::new("secret")).await.unwrap().offset;
    producer.close().await.unwrap();
    let fetched = client.fetch("t", 0, offset, 1).await.unwrap();
    assert_eq!(fetched.messages[0].value.as_ref(), b"secret");

    // Trusting the CA but presenting no certificate: refused within the
    // connect timeout, with an error rather than a hang.
    let refused = Client::builder(cluster.endpoints())
        .ca_cert(&tls.ca)
        .namespace("tls")
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await;
    assert!(refused.is_err(), "a client without certificate got in");
    // A CA file that does not exist is a clear configuration error.
    let missing = Client::builder(cluster.endpoints())
        .ca_cert(dir.join("nope.pem"))
        .connect()
        .await
        .unwrap_err();
    assert!(missing.to_string().contains("nope.pem"), "{missing}");
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}
