//! Self-tests of the harness pieces that need no product binary: process guard, fault
//! proxy and PostgreSQL. They keep the harness honest while the binaries are still being
//! written, and when a cluster test fails they tell a harness bug from a product bug.

use std::time::Duration;

use anyhow::Result;
use dr_tests::harness::postgres::Postgres;
use dr_tests::{ChildGuard, ChildSpec, FaultNet, LinkMode, TestDir, init_tracing, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::info;

fn proc_alive(pid: u32) -> bool {
    // A reaped child has no /proc entry (barring PID reuse within the test).
    std::fs::metadata(format!("/proc/{pid}")).is_ok()
}

#[tokio::test]
async fn child_guard_stops_child_by_pid_on_drop() -> Result<()> {
    init_tracing();
    let mut dir = TestDir::new()?;
    info!("--- start a child that would run for 5 minutes, then drop its guard");
    let pid = {
        let g = ChildGuard::spawn(
            ChildSpec::new("sleeper", "sleep", dir.log_path("sleeper")).args(["300"]),
        )?;
        g.pid()
    };
    assert!(
        !proc_alive(pid),
        "child {pid} still runs after its guard was dropped"
    );

    info!("--- kill9 and wait_exit");
    {
        let mut g = ChildGuard::spawn(
            ChildSpec::new("sleeper2", "sleep", dir.log_path("sleeper2")).args(["300"]),
        )?;
        g.kill9()?;
        assert!(!g.is_running());
        let mut quick = ChildGuard::spawn(
            ChildSpec::new("quick", "sh", dir.log_path("quick")).args(["-c", "echo bye; exit 3"]),
        )?;
        let st = quick.wait_exit(Duration::from_secs(30)).await?;
        assert_eq!(st.code(), Some(3));
        assert!(quick.log().contains("bye"));
    }
    dir.passed();
    Ok(())
}

/// Echo server: the destination behind the proxy.
async fn echo_server() -> Result<std::net::SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// A bash child that waits for `go`, connects to `port`, sends a ping, prints the echo,
/// then prints `closed` when the connection ends.
fn pinger(dir: &TestDir, name: &str, port: u16) -> Result<ChildGuard> {
    let script = format!(
        "while [ ! -e go-{name} ]; do sleep 0.05; done; \
         exec 3<>/dev/tcp/127.0.0.1/{port} || {{ echo connect-failed; sleep 300; }}; \
         echo ping >&3; read -r line <&3; echo \"got:$line\"; \
         read -r line <&3; echo closed; sleep 300"
    );
    ChildGuard::spawn(
        ChildSpec::new(name, "bash", dir.log_path(name))
            .args(["-c", &script])
            .cwd(dir.path()),
    )
}

async fn wait_log(g: &ChildGuard, needle: &str) -> Result<()> {
    wait_until(
        &format!("{} logs {needle:?}", g.name()),
        Duration::from_secs(30),
        Duration::from_millis(50),
        || {
            let found = g.log().contains(needle);
            async move { Ok(found.then_some(())) }
        },
    )
    .await
}

#[tokio::test]
async fn fault_proxy_attributes_connections_and_cuts_links() -> Result<()> {
    init_tracing();
    let mut dir = TestDir::new()?;
    let echo = echo_server().await?;
    let mut net = FaultNet::new();
    let proxy = net.add_proxy("echo", echo).await?;
    net.register_node("echo", "beijing");
    net.register_node("n1", "beijing");
    net.register_node("n2", "shanghai");

    info!("--- n1 connects through the proxy and is forwarded");
    let n1 = pinger(&dir, "n1", proxy.port())?;
    net.register_pid(n1.pid(), "n1");
    std::fs::write(dir.join("go-n1"), "")?;
    wait_log(&n1, "got:ping").await?;

    info!("--- cutting n1 -> echo closes n1's open connection");
    net.set_link("n1", "echo", LinkMode::Cut);
    wait_log(&n1, "closed").await?;

    info!("--- shanghai is cut off: n2 gets no echo, the unregistered test client still does");
    net.cut_region("shanghai");
    let n2 = pinger(&dir, "n2", proxy.port())?;
    net.register_pid(n2.pid(), "n2");
    std::fs::write(dir.join("go-n2"), "")?;
    wait_log(&n2, "closed").await?;
    assert!(
        !n2.log().contains("got:ping"),
        "a cut link forwarded data: {}",
        n2.log()
    );
    let mut c = tokio::net::TcpStream::connect(proxy).await?;
    c.write_all(b"x").await?;
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut b)).await??;
    assert_eq!(&b, b"x");

    info!("--- after healing, n2 is forwarded again");
    net.heal();
    let n3 = pinger(&dir, "n3", proxy.port())?;
    net.register_pid(n3.pid(), "n2");
    std::fs::write(dir.join("go-n3"), "")?;
    wait_log(&n3, "got:ping").await?;
    dir.passed();
    Ok(())
}

#[tokio::test]
async fn postgres_starts_as_user_postgres_and_stops_by_pid() -> Result<()> {
    init_tracing();
    let mut dir = TestDir::new()?;
    info!("--- initdb and start PostgreSQL 15");
    let mut pg = Postgres::start(&dir.join("pg"), &dir.log_path("postgres")).await?;
    let pid = pg.pid();
    {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&pg.url("postgres")).await?;
        let v: String = sqlx::query_scalar("show server_version")
            .fetch_one(&mut c)
            .await?;
        assert!(v.starts_with("15"), "server_version {v}");
    }
    info!("--- stop it by PID");
    pg.stop().await?;
    assert!(!proc_alive(pid));
    dir.passed();
    Ok(())
}
