//! The Kubernetes API emulator's semantics, exercised through the real `kube::Client`.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::core::Status;
use kube::{Client, Discovery, ResourceExt};
use projectionist_crds::event_store::EventStore;
use projectionist_tests::kube_api::KubeApi;
use projectionist_tests::repo;
use serde_json::json;

fn api_error(result: Result<impl std::fmt::Debug, kube::Error>) -> Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn store_api(api: &KubeApi) -> (Client, Api<EventStore>) {
    api.create_namespace("user-management").expect("namespace");
    let client = api.client().expect("client");
    let stores: Api<EventStore> = Api::namespaced(client.clone(), "user-management");
    (client, stores)
}

fn example_store() -> EventStore {
    let (store, _) = repo::user_management_resources().expect("example");
    store
}

#[tokio::test]
async fn discovery_lists_core_and_custom_kinds() {
    let api = KubeApi::start().await.expect("emulator");
    let discovery = Discovery::new(api.client().expect("client"))
        .run()
        .await
        .expect("discovery");
    let groups: Vec<String> = discovery.groups().map(|g| g.name().to_string()).collect();
    assert!(
        groups.contains(&"projectionist.dev".to_string()),
        "{groups:?}"
    );
    assert!(groups.contains(&"coordination.k8s.io".to_string()));
    let (resource, caps) = discovery
        .resolve_gvk(&kube::core::GroupVersionKind::gvk(
            "projectionist.dev",
            "v1alpha1",
            "Projection",
        ))
        .expect("Projection is served");
    assert_eq!(resource.plural, "projections");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
}

#[tokio::test]
async fn spec_writes_bump_generation_and_status_writes_do_not() {
    let api = KubeApi::start().await.expect("emulator");
    let (_, stores) = store_api(&api).await;
    let mut store = example_store();
    store.status = Some(Default::default());
    let created = stores
        .create(&PostParams::default(), &store)
        .await
        .expect("create");
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.status.is_none(), "status is ignored on create");
    assert!(created.uid().is_some());
    // Defaults from the schema are stored.
    assert_eq!(
        created.spec.stream.storage,
        projectionist_crds::event_store::Storage::File
    );

    let status = json!({"status": {"streamName": "USERS", "messages": 3}});
    let after_status = stores
        .patch_status("users", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("status patch");
    assert_eq!(after_status.metadata.generation, Some(1));
    assert_eq!(
        after_status.status.as_ref().and_then(|s| s.messages),
        Some(3)
    );

    // A status change sent to the main resource is ignored; a spec change bumps the generation.
    let spec = json!({"spec": {"stream": {"description": "changed"}}, "status": {"messages": 99}});
    let after_spec = stores
        .patch("users", &PatchParams::default(), &Patch::Merge(&spec))
        .await
        .expect("spec patch");
    assert_eq!(after_spec.metadata.generation, Some(2));
    assert_eq!(after_spec.status.as_ref().and_then(|s| s.messages), Some(3));
    assert_ne!(
        after_spec.resource_version(),
        after_status.resource_version()
    );
}

#[tokio::test]
async fn stale_writes_conflict_and_names_are_unique() {
    let api = KubeApi::start().await.expect("emulator");
    let (client, _) = store_api(&api).await;
    let maps: Api<ConfigMap> = Api::namespaced(client, "user-management");
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("a".into());
    let created = maps
        .create(&PostParams::default(), &cm)
        .await
        .expect("create");
    let again = api_error(maps.create(&PostParams::default(), &cm).await);
    assert_eq!((again.code, again.reason.as_str()), (409, "AlreadyExists"));

    let mut first = created.clone();
    first.data = Some([("k".to_string(), "1".to_string())].into());
    maps.replace("a", &PostParams::default(), &first)
        .await
        .expect("first write wins");
    let mut stale = created;
    stale.data = Some([("k".to_string(), "2".to_string())].into());
    let conflict = api_error(maps.replace("a", &PostParams::default(), &stale).await);
    assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));

    let missing: Api<ConfigMap> = Api::namespaced(api.client().expect("client"), "nowhere");
    let err = api_error(missing.create(&PostParams::default(), &cm).await);
    assert_eq!(err.code, 404);
    assert!(
        err.message.contains("namespaces \"nowhere\" not found"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn json_patch_and_merge_patch() {
    let api = KubeApi::start().await.expect("emulator");
    let (client, _) = store_api(&api).await;
    let maps: Api<ConfigMap> = Api::namespaced(client, "user-management");
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "a"}, "data": {"x": "1", "y": "2"}}))
            .expect("configmap");
    maps.create(&PostParams::default(), &cm)
        .await
        .expect("create");
    let merged = maps
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"x": null, "z": "3"}})),
        )
        .await
        .expect("merge");
    assert_eq!(
        merged.data,
        Some([("y".into(), "2".into()), ("z".into(), "3".into())].into())
    );
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/data/y", "value": "2"},
        {"op": "replace", "path": "/data/y", "value": "20"}
    ]))
    .expect("ops");
    let patched = maps
        .patch("a", &PatchParams::default(), &Patch::<()>::Json(ops))
        .await
        .expect("json patch");
    assert_eq!(
        patched
            .data
            .as_ref()
            .and_then(|d| d.get("y"))
            .map(String::as_str),
        Some("20")
    );
    let failing: json_patch::Patch =
        serde_json::from_value(json!([{"op": "test", "path": "/data/y", "value": "nope"}]))
            .expect("ops");
    let err = api_error(
        maps.patch("a", &PatchParams::default(), &Patch::<()>::Json(failing))
            .await,
    );
    assert_eq!(err.code, 422);
}

#[tokio::test]
async fn server_side_apply_tracks_field_managers() {
    let api = KubeApi::start().await.expect("emulator");
    let (client, _) = store_api(&api).await;
    let maps: Api<ConfigMap> = Api::namespaced(client, "user-management");
    let apply = |data: serde_json::Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": data});
    let a = PatchParams::apply("manager-a");
    let created = maps
        .patch("a", &a, &Patch::Apply(apply(json!({"x": "1", "y": "2"}))))
        .await
        .expect("apply creates");
    let managed = created
        .metadata
        .managed_fields
        .clone()
        .expect("managed fields");
    assert_eq!(managed[0].manager.as_deref(), Some("manager-a"));
    assert_eq!(managed[0].operation.as_deref(), Some("Apply"));

    let b = PatchParams::apply("manager-b");
    let conflict = api_error(
        maps.patch("a", &b, &Patch::Apply(apply(json!({"x": "9"}))))
            .await,
    );
    assert_eq!(conflict.code, 409);
    assert!(
        conflict.message.contains("manager-a"),
        "{}",
        conflict.message
    );
    let forced = maps
        .patch(
            "a",
            &b.clone().force(),
            &Patch::Apply(apply(json!({"x": "9"}))),
        )
        .await
        .expect("forced apply");
    assert_eq!(
        forced
            .data
            .as_ref()
            .and_then(|d| d.get("x"))
            .map(String::as_str),
        Some("9")
    );

    // manager-a stops applying y: it is removed; x now belongs to manager-b and stays.
    let after = maps
        .patch("a", &a, &Patch::Apply(apply(json!({}))))
        .await
        .expect("apply");
    assert_eq!(after.data, Some([("x".into(), "9".into())].into()));
}

#[tokio::test]
async fn watches_resume_from_a_resource_version_and_expire_when_too_old() {
    let api = KubeApi::start().await.expect("emulator");
    let (client, _) = store_api(&api).await;
    let maps: Api<ConfigMap> = Api::namespaced(client, "user-management");
    let list = maps.list(&ListParams::default()).await.expect("list");
    let from = list
        .metadata
        .resource_version
        .expect("list resourceVersion");
    for name in ["a", "b"] {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": name, "labels": {"app": name}}}))
                .expect("configmap");
        maps.create(&PostParams::default(), &cm)
            .await
            .expect("create");
    }
    maps.delete("a", &DeleteParams::default())
        .await
        .expect("delete");

    let params = WatchParams::default().labels("app=a").timeout(2);
    let events: Vec<_> = maps
        .watch(&params, &from)
        .await
        .expect("watch")
        .try_collect()
        .await
        .expect("events");
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| match e {
            WatchEvent::Added(_) => "ADDED",
            WatchEvent::Deleted(_) => "DELETED",
            WatchEvent::Modified(_) => "MODIFIED",
            WatchEvent::Bookmark(_) => "BOOKMARK",
            WatchEvent::Error(_) => "ERROR",
        })
        .collect();
    assert_eq!(kinds, ["ADDED", "DELETED"]);

    // Live changes arrive, and bookmarks when asked for.
    let mut stream = maps
        .watch(
            &WatchParams::default().timeout(30),
            &api.resource_version().to_string(),
        )
        .await
        .expect("watch")
        .boxed();
    maps.patch(
        "b",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "v"}})),
    )
    .await
    .expect("patch");
    let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an event in time")
        .expect("open stream")
        .expect("event");
    assert!(
        matches!(event, WatchEvent::Modified(ref cm) if cm.name_any() == "b"),
        "{event:?}"
    );

    api.compact();
    let mut expired = maps
        .watch(&WatchParams::default(), &from)
        .await
        .expect("watch")
        .boxed();
    match expired.next().await {
        Some(Ok(WatchEvent::Error(e))) => assert_eq!(e.code, 410),
        other => panic!("expected 410 Gone, got {other:?}"),
    }
}

#[tokio::test]
async fn finalizers_hold_deletion_and_owners_take_dependents_with_them() {
    let api = KubeApi::start().await.expect("emulator");
    let (client, stores) = store_api(&api).await;
    let mut store = example_store();
    store.metadata.finalizers = Some(vec!["projectionist.dev/cleanup".into()]);
    let created = stores
        .create(&PostParams::default(), &store)
        .await
        .expect("create");
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "user-management");
    let owned: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "owned", "ownerReferences": [{
        "apiVersion": "projectionist.dev/v1alpha1", "kind": "EventStore", "name": "users",
        "uid": created.uid(), "controller": true}]}}))
        .expect("configmap");
    maps.create(&PostParams::default(), &owned)
        .await
        .expect("create");

    stores
        .delete("users", &DeleteParams::default())
        .await
        .expect("delete");
    let terminating = stores.get("users").await.expect("still there");
    assert!(terminating.metadata.deletion_timestamp.is_some());
    assert!(maps.get("owned").await.is_ok(), "the owner still exists");
    let err = api_error(
        stores
            .patch(
                "users",
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"finalizers": ["projectionist.dev/cleanup", "x/y"]}}),
                ),
            )
            .await,
    );
    assert_eq!(err.code, 422);

    stores
        .patch(
            "users",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .expect("remove finalizer");
    assert_eq!(api_error(stores.get("users").await).code, 404);
    assert_eq!(
        api_error(maps.get("owned").await).code,
        404,
        "garbage collected"
    );

    // Deleting a namespace deletes what is in it.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "user-management");
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "s"}})).expect("secret");
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create");
    let namespaces: Api<Namespace> = Api::all(client);
    namespaces
        .delete("user-management", &DeleteParams::default())
        .await
        .expect("delete ns");
    assert_eq!(api_error(secrets.get("s").await).code, 404);
}

#[tokio::test]
async fn custom_resources_are_validated_by_schema_and_cel() {
    let api = KubeApi::start().await.expect("emulator");
    let (client, stores) = store_api(&api).await;
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client,
        "user-management",
        &kube::api::ApiResource::erase::<EventStore>(&()),
    );
    let mut bad = serde_json::to_value(example_store()).expect("json");
    bad["spec"]["nats"]["servers"] = json!(["http://not-nats"]);
    bad["spec"]["stream"]["storage"] = json!("Tape");
    let object: kube::api::DynamicObject = serde_json::from_value(bad).expect("object");
    let err = api_error(raw.create(&PostParams::default(), &object).await);
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));
    assert!(err.message.contains("spec.nats.servers"), "{}", err.message);

    // Structurally fine, refused by a CEL rule (memory storage needs its guardrail opt-in).
    let mut cel = serde_json::to_value(example_store()).expect("json");
    cel["spec"]["stream"]["storage"] = json!("Memory");
    let object: kube::api::DynamicObject = serde_json::from_value(cel).expect("object");
    let err = api_error(raw.create(&PostParams::default(), &object).await);
    assert_eq!(err.code, 422);
    assert!(
        err.message.contains("allowMemoryStorage"),
        "{}",
        err.message
    );

    // Transition rule: the stream name is immutable.
    stores
        .create(&PostParams::default(), &example_store())
        .await
        .expect("create");
    let err = api_error(
        stores
            .patch(
                "users",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"stream": {"name": "OTHER"}}})),
            )
            .await,
    );
    assert_eq!(err.code, 422);
    assert!(
        err.message.to_lowercase().contains("immutable"),
        "{}",
        err.message
    );

    // Unknown fields are pruned, or refused under strict field validation.
    let surprise = json!({"spec": {"surprise": true}});
    let strict = PatchParams::default().validation_strict();
    assert_eq!(
        api_error(
            stores
                .patch("users", &strict, &Patch::Merge(&surprise))
                .await
        )
        .code,
        422
    );
    stores
        .patch("users", &PatchParams::default(), &Patch::Merge(&surprise))
        .await
        .expect("pruned");
    let stored = raw.get("users").await.expect("get");
    assert!(stored.data["spec"].get("surprise").is_none());
}

#[tokio::test]
async fn tables_show_the_printer_columns() {
    let api = KubeApi::start().await.expect("emulator");
    let (_, stores) = store_api(&api).await;
    stores
        .create(&PostParams::default(), &example_store())
        .await
        .expect("create");
    stores
        .patch_status(
            "users",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"streamName": "USERS", "messages": 14, "lastSequence": 14,
                "conditions": [{"type": "Ready", "status": "True", "reason": "StreamReady", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})),
        )
        .await
        .expect("status");
    let client = api.client().expect("client");
    let table = get_table(
        &client,
        "/apis/projectionist.dev/v1alpha1/namespaces/user-management/eventstores",
    )
    .await;
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        columns,
        ["Name", "Stream", "Ready", "Messages", "Last-Seq", "Age"]
    );
    let cells = &table["rows"][0]["cells"];
    assert_eq!(cells[0], "users");
    assert_eq!(cells[1], "USERS");
    assert_eq!(cells[2], "True");
    assert_eq!(cells[3], 14);
}

/// A GET asking for a Table, as `kubectl get` does.
async fn get_table(client: &Client, path: &str) -> serde_json::Value {
    let request = http::Request::get(path)
        .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())
        .expect("request");
    client.request(request).await.expect("table")
}

#[tokio::test]
async fn watches_that_ask_for_bookmarks_get_them() {
    let api = KubeApi::start_with(projectionist_tests::kube_api::Options {
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    })
    .await
    .expect("emulator");
    let maps: Api<ConfigMap> = Api::namespaced(api.client().expect("client"), "default");
    let rv = api.resource_version().to_string();
    let mut stream = maps
        .watch(&WatchParams::default().timeout(10), &rv)
        .await
        .expect("watch")
        .boxed();
    let event = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a bookmark in time")
        .expect("open stream")
        .expect("event");
    match event {
        WatchEvent::Bookmark(b) => assert_eq!(b.metadata.resource_version, rv),
        other => panic!("expected a bookmark, got {other:?}"),
    }
}

#[tokio::test]
async fn a_watch_with_a_selector_sees_objects_move_in_and_out_of_it() {
    let api = KubeApi::start().await.expect("emulator");
    let maps: Api<ConfigMap> = Api::namespaced(api.client().expect("client"), "default");
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "a"}})).expect("configmap");
    maps.create(&PostParams::default(), &cm)
        .await
        .expect("create");
    let from = api.resource_version().to_string();
    let label = |v: serde_json::Value| json!({"metadata": {"labels": {"team": v}}});
    for value in [json!("x"), json!("y"), json!("x")] {
        maps.patch("a", &PatchParams::default(), &Patch::Merge(label(value)))
            .await
            .expect("patch");
    }
    let events: Vec<_> = maps
        .watch(&WatchParams::default().labels("team=x").timeout(1), &from)
        .await
        .expect("watch")
        .try_collect()
        .await
        .expect("events");
    let kinds: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Added(_) => Some("ADDED"),
            WatchEvent::Modified(_) => Some("MODIFIED"),
            WatchEvent::Deleted(_) => Some("DELETED"),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, ["ADDED", "DELETED", "ADDED"]);
}

#[tokio::test]
async fn lists_are_paginated_with_limit_and_continue() {
    let api = KubeApi::start().await.expect("emulator");
    let maps: Api<ConfigMap> = Api::namespaced(api.client().expect("client"), "default");
    for i in 0..5 {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": format!("cm-{i}")}}))
                .expect("configmap");
        maps.create(&PostParams::default(), &cm)
            .await
            .expect("create");
    }
    let mut names = Vec::new();
    let mut params = ListParams::default().limit(2);
    let mut pages = 0;
    loop {
        let page = maps.list(&params).await.expect("list");
        pages += 1;
        names.extend(page.items.iter().map(|c| c.name_any()));
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, ["cm-0", "cm-1", "cm-2", "cm-3", "cm-4"]);
}
