//! Resolves when the process is asked to stop (SIGINT or SIGTERM).

/// Waits for Ctrl-C or SIGTERM. Servers pass this to `run(listener, shutdown)`.
pub async fn signal() {
    let ctrl_c = async {
        // If installing the handler fails we cannot be interrupted this way: wait forever on
        // this branch and rely on SIGTERM.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}
