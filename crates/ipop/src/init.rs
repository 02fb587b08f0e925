//! `ipop init`: a commented config for an XMPP account (or for static peers), this device's
//! private key, and the account's password in a file of its own. The password is asked for on
//! the terminal without echo, or read from standard input when that is not a terminal. Secrets
//! are written with mode 0600, also over files that had another mode.

use anyhow::{Context, bail};
use ipnet::Ipv4Net;
use ipop::config::{self, Account, NewGroup};
use std::fs::{OpenOptions, Permissions};
use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// Where to write the config; the private key goes next to it as ipop.key, and the XMPP
    /// password as xmpp.pass.
    #[arg(default_value = config::DEFAULT_PATH)]
    pub path: PathBuf,
    /// Overwrite an existing config, key and password file.
    #[arg(long)]
    pub force: bool,
    /// Write a config for static peers only, like wg-quick's, without an XMPP account.
    #[arg(long = "static", conflicts_with_all = ["jid", "social", "group", "device", "server"])]
    pub static_peers: bool,
    /// The XMPP account, like alice@example.org. Asked for when missing and a terminal is
    /// attached.
    #[arg(long, value_name = "JID", value_parser = bare_jid)]
    pub jid: Option<String>,
    /// Link with your own devices and your friends' (the default without --group).
    #[arg(long)]
    pub social: bool,
    /// Join the group of this members-only room, like lab@conference.example.org.
    #[arg(long, value_name = "ROOM", value_parser = bare_jid, requires = "subnet")]
    pub group: Option<String>,
    /// The group's IPv4 subnet, the same on every member's device, like 10.79.0.0/24.
    #[arg(long, value_name = "CIDR", requires = "group")]
    pub subnet: Option<Ipv4Net>,
    /// Create the group's room when it does not exist (you own it, and add members with
    /// `ipop group add`).
    #[arg(long, requires = "group")]
    pub create: bool,
    /// This device's name (the XMPP resource and its DNS name). Default: the host name.
    #[arg(long, value_name = "NAME", value_parser = device_name)]
    pub device: Option<String>,
    /// The XMPP server, when the account's domain has no DNS SRV record.
    #[arg(long, value_name = "HOST:PORT", value_parser = host_port)]
    pub server: Option<String>,
}

fn bare_jid(s: &str) -> Result<String, String> {
    if config::is_bare_jid(s) {
        Ok(s.to_owned())
    } else {
        Err("expected a bare JID, user@domain, like alice@example.org".to_owned())
    }
}

fn device_name(s: &str) -> Result<String, String> {
    if !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || c.is_control() || c == '/') {
        Ok(s.to_owned())
    } else {
        Err("expected a name without spaces or '/', like laptop".to_owned())
    }
}

fn host_port(s: &str) -> Result<String, String> {
    if config::is_host_port(s) {
        Ok(s.to_owned())
    } else {
        Err("expected HOST:PORT, like xmpp.example.org:5222".to_owned())
    }
}

/// What to write.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    Static,
    Xmpp(Account),
}

/// Questions to the user: on the terminal, or scripted in tests.
trait Ask {
    /// One line of answer, without its line ending.
    fn line(&mut self, question: &str) -> anyhow::Result<String>;
    /// A secret, not echoed.
    fn secret(&mut self, question: &str) -> anyhow::Result<String>;
}

/// Questions on standard error, answers from the terminal on standard input.
struct Terminal;

impl Ask for Terminal {
    fn line(&mut self, question: &str) -> anyhow::Result<String> {
        let mut err = std::io::stderr().lock();
        write!(err, "{question}")?;
        err.flush()?;
        let mut answer = String::new();
        if std::io::stdin().lock().read_line(&mut answer)? == 0 {
            bail!("no answer to {:?} (end of input)", question.trim_end());
        }
        Ok(answer.trim().to_owned())
    }

    fn secret(&mut self, question: &str) -> anyhow::Result<String> {
        rpassword::prompt_password(question).context("cannot read the password from the terminal")
    }
}

/// Decides what to write from the flags, asking for the account on `terminal` when `--jid` is
/// missing (and asking nothing when it is given).
fn plan(args: &InitArgs, terminal: Option<&mut dyn Ask>) -> anyhow::Result<Plan> {
    if args.static_peers {
        return Ok(Plan::Static);
    }
    let flag_group = args
        .group
        .clone()
        .zip(args.subnet)
        .map(|(room, subnet)| NewGroup {
            room,
            subnet,
            create: args.create,
        });
    if let Some(jid) = &args.jid {
        return Ok(Plan::Xmpp(Account {
            jid: jid.clone(),
            device: args.device.clone(),
            server: args.server.clone(),
            social: args.social || flag_group.is_none(),
            group: flag_group,
        }));
    }
    let Some(ask) = terminal else {
        bail!(
            "--jid is missing and there is no terminal to ask for it on: give the XMPP account \
             with --jid alice@example.org, or use --static for static peers only"
        );
    };
    let jid = ask_until(ask, "XMPP account (like alice@example.org): ", bare_jid)?;
    let (social, group) = if args.social || flag_group.is_some() {
        (args.social, flag_group)
    } else {
        let social = ask_until(
            ask,
            "Link with your own devices and your friends' (contacts with a mutual subscription)? [Y/n] ",
            yes_no(true),
        )?;
        let room = ask_until(
            ask,
            "Group room to join (like lab@conference.example.org), or empty for none: ",
            |a| {
                if a.is_empty() {
                    Ok(None)
                } else {
                    bare_jid(a).map(Some)
                }
            },
        )?;
        let group = match room {
            Some(room) => {
                let subnet = ask_until(
                    ask,
                    "The group's IPv4 subnet, the same on every member's device (like 10.79.0.0/24): ",
                    |a| a.parse::<Ipv4Net>().map_err(|e| format!("{a:?}: {e}")),
                )?;
                let create = ask_until(
                    ask,
                    "Create the room if it does not exist (you own it)? [y/N] ",
                    yes_no(false),
                )?;
                Some(NewGroup {
                    room,
                    subnet,
                    create,
                })
            }
            None => None,
        };
        if !social && group.is_none() {
            bail!("no overlay chosen: link with your friends' devices, or join a group");
        }
        (social, group)
    };
    Ok(Plan::Xmpp(Account {
        jid,
        device: args.device.clone(),
        server: args.server.clone(),
        social,
        group,
    }))
}

/// Asks `question` until `parse` takes the answer, saying why it did not.
fn ask_until<T>(
    ask: &mut dyn Ask,
    question: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> anyhow::Result<T> {
    loop {
        match parse(&ask.line(question)?) {
            Ok(value) => return Ok(value),
            Err(e) => eprintln!("{e}"),
        }
    }
}

/// Parses y/yes/n/no, and an empty answer as `default`.
fn yes_no(default: bool) -> impl Fn(&str) -> Result<bool, String> {
    move |a| match a.to_ascii_lowercase().as_str() {
        "" => Ok(default),
        "y" | "yes" => Ok(true),
        "n" | "no" => Ok(false),
        _ => Err("answer y or n".to_owned()),
    }
}

/// The password: asked for on the terminal, or the first line of standard input.
fn password(jid: &str, terminal: Option<&mut dyn Ask>) -> anyhow::Result<String> {
    let password = match terminal {
        Some(ask) => ask.secret(&format!("Password for {jid}: "))?,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("cannot read the password from standard input")?;
            line.trim_end_matches(['\n', '\r']).to_owned()
        }
    };
    if password.is_empty() {
        bail!(
            "no password for {jid}: type it when asked on a terminal, or give it on standard input"
        );
    }
    Ok(password)
}

/// Writes `text` to `path`, readable and writable by its owner only (mode 0600), whether the
/// file is new or is rewritten: opening an existing file keeps its mode, so it is set again
/// before anything is written.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.set_permissions(Permissions::from_mode(0o600))
        .with_context(|| format!("cannot make {} private (mode 0600)", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Runs `ipop init`.
pub fn run(args: &InitArgs) -> anyhow::Result<()> {
    let path = args.path.as_path();
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let key_path = dir.join("ipop.key");
    let pass_path = dir.join(config::PASSWORD_FILE_NAME);
    let on_terminal = std::io::stdin().is_terminal();
    let mut terminal = Terminal;

    // Nothing is asked for, nor written, when a file is in the way.
    let mut targets = vec![path, key_path.as_path()];
    if !args.static_peers {
        targets.push(&pass_path);
    }
    if !args.force
        && let Some(p) = targets.iter().find(|p| p.exists())
    {
        bail!("{} exists; use --force to overwrite it", p.display());
    }
    let (text, password) = match plan(args, on_terminal.then_some(&mut terminal))? {
        Plan::Static => (None, None),
        Plan::Xmpp(account) => {
            let text = config::xmpp_template(&account);
            // What init writes, `ipop up` must load.
            config::Config::parse(&text).map_err(|e| {
                anyhow::anyhow!("these options make a config that does not load: {e}")
            })?;
            let password = password(&account.jid, on_terminal.then_some(&mut terminal))?;
            (Some(text), Some(password))
        }
    };

    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let secret = boringtun::x25519::StaticSecret::random_from_rng(rand_core::OsRng);
    let public = ipop_core::PublicKey::from_secret(&secret);
    write_private(
        &key_path,
        &format!("{}\n", ipop_core::key::format_secret(&secret)),
    )?;
    let mut written = vec![path.display().to_string(), key_path.display().to_string()];
    if let Some(password) = password {
        write_private(&pass_path, &format!("{password}\n"))?;
        written.push(pass_path.display().to_string());
    }
    let text = text.unwrap_or_else(|| config::template(&public));
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    let last = written.pop().unwrap_or_default();
    crate::print_out(&format!(
        "wrote {} and {last}\npublic key {public}\nfingerprint {}\n",
        written.join(", "),
        public.fingerprint()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::collections::VecDeque;
    use std::os::unix::fs::MetadataExt;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        init: InitArgs,
    }

    fn args(line: &[&str]) -> Result<InitArgs, String> {
        Cli::try_parse_from(std::iter::once("init").chain(line.iter().copied()))
            .map(|c| c.init)
            .map_err(|e| e.to_string())
    }

    /// Answers in order; running out is the end of input.
    struct Script(VecDeque<&'static str>);

    impl Ask for Script {
        fn line(&mut self, question: &str) -> anyhow::Result<String> {
            match self.0.pop_front() {
                Some(a) => Ok(a.to_owned()),
                None => bail!("no answer to {question:?}"),
            }
        }

        fn secret(&mut self, question: &str) -> anyhow::Result<String> {
            self.line(question)
        }
    }

    fn account(jid: &str, social: bool, group: Option<(&str, &str, bool)>) -> Plan {
        Plan::Xmpp(Account {
            jid: jid.to_owned(),
            device: None,
            server: None,
            social,
            group: group.map(|(room, subnet, create)| NewGroup {
                room: room.to_owned(),
                subnet: subnet.parse().expect("subnet"),
                create,
            }),
        })
    }

    #[test]
    fn flags_make_the_plan_without_questions() {
        let a = args(&["--jid", "alice@example.org"]).expect("args");
        assert_eq!(a.path, PathBuf::from(config::DEFAULT_PATH));
        assert_eq!(
            plan(&a, None).expect("plan"),
            account("alice@example.org", true, None),
            "the social overlay is the default"
        );

        let a = args(&[
            "/tmp/x/ipop.toml",
            "--jid",
            "carol@example.org",
            "--group",
            "lab@conference.example.org",
            "--subnet",
            "10.79.0.0/24",
            "--create",
            "--device",
            "desk",
            "--server",
            "10.0.0.254:5222",
        ])
        .expect("args");
        let mut script = Script(VecDeque::new());
        let Plan::Xmpp(got) = plan(&a, Some(&mut script)).expect("plan") else {
            panic!("not an XMPP plan");
        };
        assert_eq!(
            got,
            Account {
                jid: "carol@example.org".to_owned(),
                device: Some("desk".to_owned()),
                server: Some("10.0.0.254:5222".to_owned()),
                social: false,
                group: Some(NewGroup {
                    room: "lab@conference.example.org".to_owned(),
                    subnet: "10.79.0.0/24".parse().expect("subnet"),
                    create: true,
                }),
            }
        );

        let a = args(&[
            "--jid",
            "carol@example.org",
            "--social",
            "--group",
            "lab@conference.example.org",
            "--subnet",
            "10.79.0.0/24",
        ])
        .expect("args");
        assert_eq!(
            plan(&a, None).expect("plan"),
            account(
                "carol@example.org",
                true,
                Some(("lab@conference.example.org", "10.79.0.0/24", false))
            )
        );

        let a = args(&["--static", "--force"]).expect("args");
        assert!(a.force);
        assert_eq!(plan(&a, None).expect("plan"), Plan::Static);
    }

    #[test]
    fn bad_flags_are_named() {
        for (line, named) in [
            (&["--jid", "alice"][..], "--jid"),
            (&["--jid", "a@b", "--server", "nohost"], "--server"),
            (&["--jid", "a@b", "--device", "my laptop"], "--device"),
            (&["--jid", "a@b", "--group", "lab@c.b"], "--subnet"),
            (&["--jid", "a@b", "--subnet", "10.0.0.0/24"], "--group"),
            (
                &[
                    "--jid",
                    "a@b",
                    "--group",
                    "lab@c.b",
                    "--subnet",
                    "10.0.0.300/24",
                ],
                "--subnet",
            ),
            (&["--jid", "a@b", "--create"], "--group"),
            (&["--static", "--jid", "a@b"], "--jid"),
            (&["--static", "--social"], "--social"),
        ] {
            let e = args(line).expect_err("refused");
            assert!(e.contains(named), "{line:?}: {e}");
        }
    }

    #[test]
    fn without_jid_or_terminal_the_missing_flag_is_named() {
        let a = args(&["--social"]).expect("args");
        let e = plan(&a, None).expect_err("no account").to_string();
        assert!(e.contains("--jid") && e.contains("--static"), "{e}");
    }

    #[test]
    fn on_a_terminal_the_account_is_asked_for() {
        let a = args(&[]).expect("args");
        // A wrong JID and a wrong subnet are asked again.
        let mut script = Script(VecDeque::from([
            "bob",
            "bob@example.org",
            "",
            "lab@conference.example.org",
            "10.79.0.0/33",
            "10.79.0.0/24",
            "maybe",
            "y",
        ]));
        assert_eq!(
            plan(&a, Some(&mut script)).expect("plan"),
            account(
                "bob@example.org",
                true,
                Some(("lab@conference.example.org", "10.79.0.0/24", true))
            )
        );
        assert!(script.0.is_empty());

        // Overlays given as flags are not asked for.
        let a = args(&["--social"]).expect("args");
        let mut script = Script(VecDeque::from(["bob@example.org"]));
        assert_eq!(
            plan(&a, Some(&mut script)).expect("plan"),
            account("bob@example.org", true, None)
        );

        let mut script = Script(VecDeque::from(["bob@example.org", "n", ""]));
        let e = plan(&args(&[]).expect("args"), Some(&mut script)).expect_err("no overlay");
        assert!(e.to_string().contains("no overlay"), "{e}");

        let mut script = Script(VecDeque::from(["bob@example.org"]));
        let e = plan(&args(&[]).expect("args"), Some(&mut script)).expect_err("end of input");
        assert!(e.to_string().contains("no answer"), "{e}");

        // Given --jid, nothing is asked.
        let a = args(&["--jid", "bob@example.org"]).expect("args");
        let mut script = Script(VecDeque::new());
        assert_eq!(
            plan(&a, Some(&mut script)).expect("plan"),
            account("bob@example.org", true, None)
        );
    }

    #[test]
    fn an_empty_password_is_refused() {
        let mut script = Script(VecDeque::from([""]));
        let e = password("bob@example.org", Some(&mut script)).expect_err("empty");
        assert!(
            e.to_string().contains("no password for bob@example.org"),
            "{e}"
        );
        let mut script = Script(VecDeque::from(["pw with spaces "]));
        assert_eq!(
            password("bob@example.org", Some(&mut script)).expect("password"),
            "pw with spaces "
        );
    }

    #[test]
    fn secrets_are_written_with_mode_0600_over_any_mode() {
        let dir = ipop_lab::TestDir::new("init-mode");
        let path = dir.path().join("secret");
        let mode = |p: &Path| std::fs::metadata(p).expect("metadata").mode() & 0o7777;

        write_private(&path, "one\n").expect("new file");
        assert_eq!(mode(&path), 0o600);
        std::fs::set_permissions(&path, Permissions::from_mode(0o644)).expect("chmod");
        write_private(&path, "two\n").expect("rewritten file");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "two\n");
    }
}
