//! TLS set-up shared by the HTTP and AMQP clients.

/// reqwest is built without a default crypto backend (aws-lc needs cmake and a long C build);
/// ring is installed once, process-wide, before the first TLS client is made.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
