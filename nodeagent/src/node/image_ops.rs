//! The image store on the node ([`crate::images`] does the file and HTTP work).
//!
//! One operation per image name at a time (a second PullImage or DeleteImage of it gets
//! `Busy`). DeleteImage also holds the membership lock, so no CreateVm naming the image slips
//! in between its check and the removal; it refuses while any VM's spec uses the image
//! (kernel, initrd or a read-only disk), running or not, as the VM could not start without it.

use super::*;

impl Node {
    // ----- images --------------------------------------------------------------------------

    pub async fn pull_image(&self, url: &str, sha256: &str) -> Result<PathBuf, NodeError> {
        self.pull_image_with(url, sha256, &images::JobControl::default())
            .await
    }

    /// A pull whose progress `control` shows and through which it can be canceled.
    pub async fn pull_image_with(
        &self,
        url: &str,
        sha256: &str,
        control: &images::JobControl,
    ) -> Result<PathBuf, NodeError> {
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| NodeError::InvalidArgument(format!("invalid image URL {url:?}: {e}")))?;
        let name = images::image_name_from_url(&parsed)?;
        {
            let mut pulls = self.pulls.lock().map_err(io)?;
            if !pulls.insert(name.clone()) {
                return Err(NodeError::Busy(format!(
                    "image {name} is already being pulled"
                )));
            }
        }
        let images_dir = self.cfg.layout.images_dir();
        let result = images::pull(&self.http, &images_dir, url, sha256, control).await;
        if let Ok(mut pulls) = self.pulls.lock() {
            pulls.remove(&name);
        }
        Ok(result?)
    }

    pub async fn list_images(&self) -> Result<Vec<ImageInfo>, NodeError> {
        let dir = self.cfg.layout.images_dir();
        Ok(blocking(move || images::list(&dir)).await??)
    }

    pub async fn delete_image(&self, name: &str) -> Result<(), NodeError> {
        if !images::valid_image_path(name) {
            return Err(NodeError::InvalidArgument(format!(
                "invalid image name {name:?}: '/'-separated file names of letters, digits, \
                 '.', '_', '-', '+' (as ListImages shows them)"
            )));
        }
        {
            let mut ops = self.pulls.lock().map_err(io)?;
            if !ops.insert(name.to_owned()) {
                return Err(NodeError::Busy(format!(
                    "image {name} is being pulled or deleted"
                )));
            }
        }
        let result = self.delete_image_registered(name).await;
        if let Ok(mut ops) = self.pulls.lock() {
            ops.remove(name);
        }
        result
    }

    async fn delete_image_registered(&self, name: &str) -> Result<(), NodeError> {
        let _membership = self.membership.lock().await;
        let specs: Vec<(String, VmSpec)> = self
            .list()
            .iter()
            .map(|vm| (vm.name.clone(), vm.spec()))
            .collect();
        let (stores, images_dir, image) = (
            self.stores.clone(),
            self.cfg.layout.images_dir(),
            name.to_owned(),
        );
        let users = blocking(move || {
            let path = images_dir.join(&image);
            let canonical = path.canonicalize().ok();
            let mut users = Vec::new();
            for (vm, spec) in specs {
                let uses = match spec.resolve(&vm, &stores) {
                    Ok(r) => {
                        let mut files: Vec<&PathBuf> = r.disks.iter().map(|d| &d.path).collect();
                        if let Boot::Kernel { kernel, initrd, .. } = &r.boot {
                            files.push(kernel);
                            files.extend(initrd);
                        }
                        files.iter().any(|f| Some(*f) == canonical.as_ref())
                    }
                    // A spec that does not resolve (a file of it is missing): by its words.
                    Err(_) => {
                        let mut named: Vec<&str> =
                            spec.disks.iter().map(|d| d.path.as_str()).collect();
                        named.extend(spec.kernel.as_deref());
                        named.extend(spec.initrd.as_deref());
                        named.iter().any(|n| {
                            let n = Path::new(n);
                            n == Path::new(&image) || n == path
                        })
                    }
                };
                if uses {
                    users.push(vm);
                }
            }
            users
        })
        .await?;
        if !users.is_empty() {
            return Err(NodeError::InUse(format!(
                "image {name} is used by VM{} {}; delete {} or change {} first",
                if users.len() == 1 { "" } else { "s" },
                users.join(", "),
                if users.len() == 1 { "it" } else { "them" },
                if users.len() == 1 {
                    "its spec"
                } else {
                    "their specs"
                },
            )));
        }
        let (dir, image) = (self.cfg.layout.images_dir(), name.to_owned());
        blocking(move || images::delete(&dir, &image)).await??;
        tracing::info!(image = %name, "image deleted");
        Ok(())
    }
}
