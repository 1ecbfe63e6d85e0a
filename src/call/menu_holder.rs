//! The menus and prompts calls start on, one per line, and reloading them while calls are in
//! progress.
//!
//! [`MenuHolder`] is shared by the call acceptor (a new call takes the current [`ActiveMenu`]
//! of the line it dialled: [`MenuHolder::for_call`]), the call-backs (their prompts) and the
//! admin API (`POST /admin/menu/reload`). It touches no call: a call keeps the `Arc` it started
//! with. The default line is `--menu`; `lines:` adds numbers with menus of their own (see
//! [`super::lines`]). Each distinct menu file is loaded, checked and reloaded apart: a reload
//! swaps in every menu that passes and keeps the old one of every menu that does not.

use super::lines::{normalise, CalledFrom, LineConfig, NumberingConfig};
use crate::media::prompt::PromptStore;
use crate::menu::schema::MenuFile;
use crate::menu::validate::{self, LoadedMenu, MenuError, PromptIndex};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tracing::{info, warn};

/// The menu and prompts new calls start on. Replaced whole on reload; a call keeps the `Arc`
/// it started with, so calls in progress finish on their own menu and prompts. Prompts travel
/// with the menu so a reloaded menu never refers to a prompt that was not loaded.
#[derive(Debug, Clone)]
pub struct ActiveMenu {
    pub file: Arc<MenuFile>,
    /// The menu after screening (`top`).
    pub main: String,
    pub path: PathBuf,
    pub prompts: Arc<PromptStore>,
    /// The menu's schedules, compiled.
    pub schedules: Arc<crate::menu::schedule::Schedules>,
}

/// Why a menu could not be (re)loaded. The menu in service stays.
#[derive(Debug, thiserror::Error)]
pub enum MenuLoadError {
    #[error("prompts: {0}")]
    Prompts(#[from] crate::media::prompt::PromptError),
    #[error("prompts: no prompts found in {0}")]
    NoPrompts(String),
    /// `ivr311 check` problems, one `path:line:col: message` per line.
    #[error("{0}")]
    Menu(#[from] crate::menu::validate::MenuError),
    /// Several menus' problems (lines with menus of their own), each as [`Self::Menu`].
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Menus(Vec<crate::menu::validate::MenuError>),
}

impl MenuLoadError {
    /// The individual `path:line:col: message` lines (one line for other errors).
    pub fn lines(&self) -> Vec<String> {
        self.to_string().lines().map(str::to_owned).collect()
    }
}

/// Load prompts and a menu, and check the menu against them (blocking: file I/O and
/// resampling; run it off the async threads).
pub fn load_active_menu(menu: &Path, prompts_dir: &Path) -> Result<ActiveMenu, MenuLoadError> {
    let (prompts, mut menus) = load_menus(&[menu.to_owned()], prompts_dir)?;
    let loaded = menus
        .pop()
        .ok_or_else(|| MenuLoadError::NoPrompts("no menu".into()))??;
    Ok(active(loaded, prompts))
}

/// One menu file, loaded and checked, or its problems.
pub type MenuResult = Result<LoadedMenu, MenuError>;

/// Load the prompts once, and each of `menus` checked against them (blocking). The prompts'
/// failure fails all; each menu's own problems are its own result.
pub fn load_menus(
    menus: &[PathBuf],
    prompts_dir: &Path,
) -> Result<(Arc<PromptStore>, Vec<MenuResult>), MenuLoadError> {
    let index = PromptIndex::from_dir(prompts_dir).map_err(|source| MenuError::Io {
        path: prompts_dir.to_owned(),
        source,
    })?;
    let loaded = menus.iter().map(|m| validate::load(m, &index)).collect();
    let prompts = PromptStore::load_dir(prompts_dir)?;
    if prompts.is_empty() {
        return Err(MenuLoadError::NoPrompts(prompts_dir.display().to_string()));
    }
    Ok((Arc::new(prompts), loaded))
}

fn active(loaded: LoadedMenu, prompts: Arc<PromptStore>) -> ActiveMenu {
    ActiveMenu {
        file: Arc::new(loaded.file),
        main: loaded.main,
        path: loaded.path,
        prompts,
        schedules: loaded.schedules,
    }
}

/// The label of the default line (`--menu`) in metrics and logs.
pub const DEFAULT_LINE: &str = "default";

/// One menu file and the menu loaded from it.
#[derive(Debug)]
struct Slot {
    path: PathBuf,
    current: RwLock<Arc<ActiveMenu>>,
}

/// One configured line.
#[derive(Debug)]
struct Line {
    /// The number as configured (its label in metrics).
    label: String,
    /// The index of its menu in `slots`.
    slot: usize,
}

/// The line a call dialled and the menu it starts on.
#[derive(Debug, Clone)]
pub struct LineChoice {
    /// The line's number as configured, or [`DEFAULT_LINE`].
    pub line: String,
    /// The number the caller dialled as sent, and where it was read (none for the default
    /// line chosen without a match: the Request-URI user is kept as dialled).
    pub dialled: Option<(CalledFrom, String)>,
    pub menu: Arc<ActiveMenu>,
}

/// Holder of the current menus (the default line's, then one per distinct line menu), and
/// where to reload them from.
#[derive(Debug)]
pub struct MenuHolder {
    /// `slots[0]` is the default line's (`--menu`).
    slots: Vec<Slot>,
    lines: Vec<Line>,
    /// The lines' numbers, normalised, in the order of `lines`.
    numbers: Vec<String>,
    numbering: NumberingConfig,
    prompts_dir: PathBuf,
    /// Serialises reloads (two admins at once).
    reloading: tokio::sync::Mutex<()>,
}

impl MenuHolder {
    /// One line: the default.
    pub fn new(menu: ActiveMenu, menu_path: PathBuf, prompts_dir: PathBuf) -> Self {
        MenuHolder {
            slots: vec![Slot {
                path: menu_path,
                current: RwLock::new(Arc::new(menu)),
            }],
            lines: Vec::new(),
            numbers: Vec::new(),
            numbering: NumberingConfig::default(),
            prompts_dir,
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// Every line's menu, loaded and checked (blocking): the default line's from `menu_path`,
    /// each distinct file of `lines` once. Any problem fails (the server does not start).
    pub fn load(
        menu_path: &Path,
        prompts_dir: &Path,
        lines: &[LineConfig],
        numbering: &NumberingConfig,
    ) -> Result<MenuHolder, MenuLoadError> {
        let mut paths = vec![menu_path.to_owned()];
        let mut line_slots = Vec::new();
        for l in lines {
            let slot = match paths.iter().position(|p| *p == l.menu) {
                Some(i) => i,
                None => {
                    paths.push(l.menu.clone());
                    paths.len() - 1
                }
            };
            line_slots.push(Line {
                label: l.number.clone(),
                slot,
            });
        }
        let (prompts, loaded) = load_menus(&paths, prompts_dir)?;
        let mut slots = Vec::new();
        let mut problems = Vec::new();
        for (path, m) in paths.into_iter().zip(loaded) {
            match m {
                Ok(m) => slots.push(Slot {
                    path,
                    current: RwLock::new(Arc::new(active(m, prompts.clone()))),
                }),
                Err(e) => problems.push(e),
            }
        }
        match problems.len() {
            0 => {}
            1 => return Err(MenuLoadError::Menu(problems.remove(0))),
            _ => return Err(MenuLoadError::Menus(problems)),
        }
        Ok(MenuHolder {
            slots,
            numbers: lines
                .iter()
                .map(|l| normalise(&l.number, numbering))
                .collect(),
            lines: line_slots,
            numbering: numbering.clone(),
            prompts_dir: prompts_dir.to_owned(),
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    fn current(slot: &Slot) -> Arc<ActiveMenu> {
        match slot.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set(slot: &Slot, menu: ActiveMenu) {
        match slot.current.write() {
            Ok(mut g) => *g = Arc::new(menu),
            Err(p) => *p.into_inner() = Arc::new(menu),
        }
    }

    /// The default line's menu.
    pub fn get(&self) -> Arc<ActiveMenu> {
        Self::current(&self.slots[0])
    }

    /// Every menu in service, with its file (the default line's first), for `ivr311 check`
    /// and the admin view.
    pub fn menus(&self) -> Vec<(PathBuf, Arc<ActiveMenu>)> {
        (self.slots.iter())
            .map(|s| (s.path.clone(), Self::current(s)))
            .collect()
    }

    /// Replace the default line's menu.
    pub fn replace(&self, menu: ActiveMenu) {
        Self::set(&self.slots[0], menu);
    }

    /// The line a call dialled (see [`super::lines`] for which number wins) and its menu.
    pub fn for_call(&self, called: &[(CalledFrom, String)]) -> LineChoice {
        match super::lines::choose(&self.numbers, called, &self.numbering) {
            Some((i, from, number)) => {
                let line = &self.lines[i];
                LineChoice {
                    line: line.label.clone(),
                    dialled: Some((from, number.to_owned())),
                    menu: Self::current(&self.slots[line.slot]),
                }
            }
            None => LineChoice {
                line: DEFAULT_LINE.to_owned(),
                dialled: None,
                menu: self.get(),
            },
        }
    }

    /// Validate every menu file (and the prompts) again and swap each one that passes in for
    /// new calls. A menu with problems keeps the one in service (the others still change), and
    /// its problems are returned; a problem with the prompts changes nothing. `Ok`: the default
    /// line's menu.
    pub async fn reload(&self) -> Result<Arc<ActiveMenu>, MenuLoadError> {
        let _one = self.reloading.lock().await;
        let paths: Vec<PathBuf> = self.slots.iter().map(|s| s.path.clone()).collect();
        let p = self.prompts_dir.clone();
        let (prompts, loaded) = tokio::task::spawn_blocking(move || load_menus(&paths, &p))
            .await
            .map_err(|_| MenuLoadError::NoPrompts("reload task failed".into()))??;
        let mut problems = Vec::new();
        for (slot, m) in self.slots.iter().zip(loaded) {
            match m {
                Ok(m) => {
                    Self::set(slot, active(m, prompts.clone()));
                    let now = Self::current(slot);
                    info!(menu = %slot.path.display(), menus = now.file.menus.len(), "menu reloaded for new calls");
                }
                Err(e) => {
                    warn!(menu = %slot.path.display(), error = %e, "menu reload refused; this menu stays in service");
                    problems.push(e);
                }
            }
        }
        match problems.len() {
            0 => Ok(self.get()),
            1 => Err(MenuLoadError::Menu(problems.remove(0))),
            _ => Err(MenuLoadError::Menus(problems)),
        }
    }
}
