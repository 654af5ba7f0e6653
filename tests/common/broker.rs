//! A private RabbitMQ node for a test: Debian's rabbitmq-server on 127.0.0.1 with its own
//! ports, node name and folders (owned by the `rabbitmq` user, which the server runs as),
//! stopped (and its process group killed) when dropped, even on a panic. Plus a small
//! synchronous client for the test's side (publish, fetch the answers).

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const SERVER: &str = "/usr/sbin/rabbitmq-server";

pub struct Broker {
    dir: tempfile::TempDir,
    pub node: String,
    pub port: u16,
    server: Option<Child>,
    rt: tokio::runtime::Runtime,
}

/// Is rabbitmq-server here? Under CI=true its absence is a failure, else the test is skipped
/// with a note.
pub fn available() -> bool {
    if Path::new(SERVER).exists() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{SERVER} is missing (apt-get install rabbitmq-server)");
    }
    eprintln!("NOTE: {SERVER} is not installed: skipping this AMQP test");
    false
}

/// A port free on 127.0.0.1 whose +20000 (the node's distribution port) is free too.
fn free_port() -> u16 {
    for _ in 0..200 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if !(10000..45535).contains(&p) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", p + 20000)).is_ok()
            && std::net::TcpListener::bind(("0.0.0.0", p + 20000)).is_ok()
        {
            return p;
        }
    }
    panic!("no free port pair");
}

impl Broker {
    pub fn start() -> Broker {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = tempfile::Builder::new()
            .prefix("rabbit")
            .tempdir()
            .expect("tempdir");
        let root = dir.path();
        for d in ["home", "mnesia", "log", "gen", "plugins-expand", "schema"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("enabled_plugins"), "[].\n").unwrap();
        std::fs::write(root.join("rabbitmq.conf"), "loopback_users = none\n").unwrap();
        // The server runs as the rabbitmq user: it must reach and own its folders.
        let status = Command::new("chmod").arg("755").arg(root).status().unwrap();
        assert!(status.success());
        let status = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(root)
            .status()
            .unwrap();
        assert!(status.success(), "chown to rabbitmq (run as root)");
        let node = format!(
            "bitest{}x{}@localhost",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let mut b = Broker {
            dir,
            node,
            port: free_port(),
            server: None,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        };
        b.start_node();
        b
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn env(&self, cmd: &mut Command) {
        let p = |s: &str| self.path(s);
        cmd.env("HOME", p("home"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_MNESIA_BASE", p("mnesia"))
            .env("RABBITMQ_LOG_BASE", p("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", p("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", p("pid"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", p("feature_flags"))
            .env("RABBITMQ_GENERATED_CONFIG_DIR", p("gen"))
            .env("RABBITMQ_SCHEMA_DIR", p("schema"))
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", p("plugins-expand"))
            .env("RABBITMQ_CONFIG_FILE", p("rabbitmq"));
    }

    /// Starts the node (again) and waits until it serves.
    pub fn start_node(&mut self) {
        let _ = std::fs::remove_file(self.path("pid"));
        let mut cmd = Command::new(SERVER);
        self.env(&mut cmd);
        use std::os::unix::process::CommandExt;
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.server = Some(cmd.spawn().expect("start rabbitmq-server"));
        let mut wait = Command::new("rabbitmqctl");
        self.env(&mut wait);
        let out = wait
            .args(["-n", &self.node, "-t", "60", "wait"])
            .arg(self.path("pid"))
            .output()
            .expect("rabbitmqctl wait");
        assert!(
            out.status.success(),
            "rabbitmq node {} did not start: {}",
            self.node,
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            build_image::wait::wait_for(Duration::from_secs(30), || std::net::TcpStream::connect(
                ("127.0.0.1", self.port)
            )
            .is_ok()),
            "the node does not listen"
        );
    }

    /// Stops the node (its data stays: durable queues and persistent messages survive).
    pub fn stop_node(&mut self) {
        let mut stop = Command::new("rabbitmqctl");
        self.env(&mut stop);
        let _ = stop
            .args(["-n", &self.node, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut c) = self.server.take() {
            let _ = c.wait();
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    async fn connect(&self) -> Connection {
        Connection::connect(&self.url(), ConnectionProperties::default())
            .await
            .expect("connect to the test broker")
    }

    /// Publishes each body persistent to the default exchange with this routing key (declared
    /// durable), with confirms.
    pub fn publish(&self, queue: &str, bodies: &[Vec<u8>]) {
        self.publish_as(queue, bodies, false)
    }

    /// Publishes to a queue that exists (declared passively: its arguments are left as they are).
    pub fn publish_to_existing(&self, queue: &str, bodies: &[Vec<u8>]) {
        self.publish_as(queue, bodies, true)
    }

    fn publish_as(&self, queue: &str, bodies: &[Vec<u8>], existing: bool) {
        self.rt.block_on(async {
            let c = self.connect().await;
            let ch = c.create_channel().await.unwrap();
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            ch.queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: existing,
                    ..QueueDeclareOptions::durable()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
            for b in bodies {
                ch.basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    b,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            }
            let _ = c.close(200, "".into()).await;
        })
    }

    /// Takes every message now in `queue` (acked), with its delivery mode.
    pub fn take(&self, queue: &str) -> Vec<(Vec<u8>, Option<u8>)> {
        self.take_as(queue, false)
    }

    /// Takes every message now in a queue that exists (declared passively).
    pub fn take_existing(&self, queue: &str) -> Vec<(Vec<u8>, Option<u8>)> {
        self.take_as(queue, true)
    }

    fn take_as(&self, queue: &str, existing: bool) -> Vec<(Vec<u8>, Option<u8>)> {
        self.rt.block_on(async {
            let c = self.connect().await;
            let ch = c.create_channel().await.unwrap();
            ch.queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: existing,
                    ..QueueDeclareOptions::durable()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
            let mut out = Vec::new();
            while let Some(m) = ch
                .basic_get(queue.into(), BasicGetOptions::default())
                .await
                .unwrap()
            {
                out.push((m.data.clone(), *m.properties.delivery_mode()));
                m.ack(BasicAckOptions::default()).await.unwrap();
            }
            let _ = c.close(200, "".into()).await;
            out
        })
    }

    /// Messages waiting in `queue` (ready, not unacked).
    pub fn depth(&self, queue: &str) -> u32 {
        self.rt.block_on(async {
            let c = self.connect().await;
            let ch = c.create_channel().await.unwrap();
            let q = ch
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions::durable(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            let _ = c.close(200, "".into()).await;
            q.message_count()
        })
    }
}

impl Broker {
    /// Declares `queue` durable with string arguments, as an operator does (say a dead-letter
    /// exchange, or `x-queue-type = quorum`).
    pub fn declare_with(&self, queue: &str, arguments: &[(&str, &str)]) {
        self.rt.block_on(async {
            let c = self.connect().await;
            let ch = c.create_channel().await.unwrap();
            let mut t = FieldTable::default();
            for (k, v) in arguments {
                t.insert(
                    (*k).into(),
                    lapin::types::AMQPValue::LongString((*v).into()),
                );
            }
            ch.queue_declare(queue.into(), QueueDeclareOptions::durable(), t)
                .await
                .unwrap();
            let _ = c.close(200, "".into()).await;
        })
    }

    /// The arguments a queue has, as the broker lists them (`rabbitmqctl list_queues`).
    pub fn queue_arguments(&self, queue: &str) -> String {
        let mut cmd = Command::new("rabbitmqctl");
        self.env(&mut cmd);
        let out = cmd
            .args(["-n", &self.node, "-q", "list_queues", "name", "arguments"])
            .output()
            .expect("rabbitmqctl list_queues");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(queue))
            .unwrap_or_default()
            .to_string()
    }

    /// Runs `rabbitmqctl ARGS` against this node; its stdout (the command must succeed).
    pub fn ctl(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("rabbitmqctl");
        self.env(&mut cmd);
        let out = cmd
            .args(["-n", &self.node])
            .args(args)
            .output()
            .expect("rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Deletes `queue` and the messages in it (an operator's maintenance).
    pub fn delete_queue(&self, queue: &str) {
        self.rt.block_on(async {
            let c = self.connect().await;
            let ch = c.create_channel().await.unwrap();
            ch.queue_delete(queue.into(), QueueDeleteOptions::default())
                .await
                .unwrap();
            let _ = c.close(200, "".into()).await;
        })
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop_node();
    }
}

/// A Ruote workitem as the engine publishes it: wfid `wf-N`, image_id `imgN`, kickstart `ks`.
pub fn ruote(n: usize, ks: &str) -> serde_json::Value {
    serde_json::json!({
        "fei": {"wfid": format!("wf-{n}"), "subid": "s", "expid": "0_0_1", "engine_id": "engine"},
        "participant_name": "build_image",
        "fields": {
            "params": {},
            "image": {
                "image_id": format!("img{n}"),
                "kickstart": ks,
                "image_type": "loop",
                "name": format!("img-img{n}"),
                "arch": "i586"
            },
            "msg": []
        }
    })
}
