//! The menu and prompts calls start on, and reloading them while calls are in progress.
//!
//! [`MenuHolder`] is shared by the call acceptor (new calls take the current [`ActiveMenu`]),
//! the call-backs (their prompts) and the admin API (`POST /admin/menu/reload`). It touches no
//! call: a call keeps the `Arc` it started with.

use crate::media::prompt::PromptStore;
use crate::menu::schema::MenuFile;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tracing::info;

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
    use crate::menu::validate::{self, MenuError, PromptIndex};
    let index = PromptIndex::from_dir(prompts_dir).map_err(|source| MenuError::Io {
        path: prompts_dir.to_owned(),
        source,
    })?;
    let loaded = validate::load(menu, &index)?;
    let prompts = PromptStore::load_dir(prompts_dir)?;
    if prompts.is_empty() {
        return Err(MenuLoadError::NoPrompts(prompts_dir.display().to_string()));
    }
    Ok(ActiveMenu {
        file: Arc::new(loaded.file),
        main: loaded.main,
        path: loaded.path,
        prompts: Arc::new(prompts),
        schedules: loaded.schedules,
    })
}

/// Holder of the current menu, and where to reload it from.
#[derive(Debug)]
pub struct MenuHolder {
    current: RwLock<Arc<ActiveMenu>>,
    menu_path: PathBuf,
    prompts_dir: PathBuf,
    /// Serialises reloads (two admins at once).
    reloading: tokio::sync::Mutex<()>,
}

impl MenuHolder {
    pub fn new(menu: ActiveMenu, menu_path: PathBuf, prompts_dir: PathBuf) -> Self {
        MenuHolder {
            current: RwLock::new(Arc::new(menu)),
            menu_path,
            prompts_dir,
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    pub fn get(&self) -> Arc<ActiveMenu> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn replace(&self, menu: ActiveMenu) {
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(menu),
            Err(p) => *p.into_inner() = Arc::new(menu),
        }
    }

    /// Validate the menu file (and prompts) again and swap it in for new calls; on any
    /// problem the menu in service stays and the problems are returned.
    pub async fn reload(&self) -> Result<Arc<ActiveMenu>, MenuLoadError> {
        let _one = self.reloading.lock().await;
        let (m, p) = (self.menu_path.clone(), self.prompts_dir.clone());
        let loaded = tokio::task::spawn_blocking(move || load_active_menu(&m, &p))
            .await
            .map_err(|_| MenuLoadError::NoPrompts("reload task failed".into()))??;
        self.replace(loaded);
        let now = self.get();
        info!(menu = %now.path.display(), menus = now.file.menus.len(), "menu reloaded for new calls");
        Ok(now)
    }
}
