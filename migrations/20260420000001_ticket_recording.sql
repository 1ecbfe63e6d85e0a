-- A phone ticket's recording (the caller's spoken description) is personal data: it gets its
-- own column, read only through the admin API, and `media_url` is kept for media a web client
-- posted (published in Open311). `recording` is a file name in `storage.recordings_dir`.
ALTER TABLE tickets ADD COLUMN recording TEXT;

-- Tickets filed before this column held their recording in media_url as /recordings/<file>.
UPDATE tickets
SET recording = substr(media_url, length('/recordings/') + 1),
    media_url = NULL
WHERE channel = 'phone' AND media_url LIKE '/recordings/%';
